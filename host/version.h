/* version.h — the moonlit release number, shown by `moonlit --version` and
 * the REPL banner. */
#ifndef ML_VERSION_H
#define ML_VERSION_H

#define ML_VERSION "0.1.0"

#endif
