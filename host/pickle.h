/* pickle.h — PyTorch `.ckpt`/`.pt` checkpoints read without running them.
 *
 * A torch.save file is a zip holding `<root>/data.pkl` (a pickle of the
 * saved object) and `<root>/data/<key>` (the raw bytes of each storage).
 * Python's unpickler executes whatever the pickle names, which is how a
 * malicious checkpoint runs code.  This reader interprets the pickle as
 * data only: it knows the opcodes torch's records use and a short list of
 * globals (the tensor-rebuild functions, the storage types,
 * collections.OrderedDict, and a few inert classes real Stable Diffusion
 * checkpoints mention, which are kept as opaque values and never called).
 * Any other global is refused by name before anything else happens;
 * nothing from the file is ever executed.
 *
 * The tensors kept are the values of the top-level dict, or of its
 * "state_dict" entry when it has one (Lightning checkpoints). */
#ifndef ML_PICKLE_H
#define ML_PICKLE_H

#include <stdint.h>
#include "tensor.h"

typedef struct ml_ckpt ml_ckpt;

ml_ckpt *ml_ckpt_open(const char *path);
void ml_ckpt_close(ml_ckpt *c); /* NULL-safe */
int ml_ckpt_count(const ml_ckpt *c);
/* Name of tensor i (0-based, in the order the pickle lists them). */
const char *ml_ckpt_name(const ml_ckpt *c, int i);
/* A fresh CPU tensor owning its memory, in the stored dtype. */
ml_tensor *ml_ckpt_read(const ml_ckpt *c, int i);
/* The value of an integer entry of the top-level dict (global_step, epoch),
 * or `fallback` when absent or not an integer. */
int64_t ml_ckpt_int(const ml_ckpt *c, const char *key, int64_t fallback);

#endif
