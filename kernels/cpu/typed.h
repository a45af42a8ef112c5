/* typed.h — instantiate a typed kernel body twice, for float (names
 * suffixed _f32) and for double (_f64).  The includer defines
 * ML_TYPED_BODY as the body's file name, e.g.
 *     #define ML_TYPED_BODY "norm_t.h"
 *     #include "typed.h"
 * Inside the body, T is the element type and SFX(name) adds the suffix. */
#ifndef ML_TYPED_BODY
#error "define ML_TYPED_BODY before including typed.h"
#endif
#define T float
#define SFX(name) name##_f32
#include ML_TYPED_BODY
#undef T
#undef SFX
#define T double
#define SFX(name) name##_f64
#include ML_TYPED_BODY
#undef T
#undef SFX
#undef ML_TYPED_BODY
