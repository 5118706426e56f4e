/* blockstream._blockstream: Python binding of the C engine.
 *
 * The public, documented API is blockstream/__init__.py; this module is its
 * private back end.  Every entry point re-validates its arguments so that
 * calling it directly with nonsense raises TypeError/ValueError instead of
 * crashing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>

#include <zstd.h>

#include "bs.h"

static PyObject *ErrorClass;        /* blockstream.BlockstreamError */
static PyObject *CancelledClass;    /* blockstream.Cancelled */

#define MIN_BLOCK (4ULL << 10)
#define MAX_BLOCK (16ULL << 20)
#define MIN_REQUEST (4ULL << 10)
#define MAX_REQUEST (32ULL << 20)
#define MAX_CONNECTIONS 64
#define MAX_IN_FLIGHT 1024
#define MAX_DISK (1ULL << 62)
#define MAX_BUFFERS (8ULL << 30)

/* ---- argument helpers ---- */

static int
get_u64 (PyObject *o, const char *name, uint64_t *out)
{
  if (!PyLong_Check (o) || PyBool_Check (o)) {
    PyErr_Format (PyExc_TypeError, "%s must be an int, not %.100s", name,
                  Py_TYPE (o)->tp_name);
    return -1;
  }
  int overflow = 0;
  long long v = PyLong_AsLongLongAndOverflow (o, &overflow);
  if (v == -1 && PyErr_Occurred ())
    return -1;
  if (overflow != 0 || v < 0 || (uint64_t) v > MAX_DISK) {
    PyErr_Format (PyExc_ValueError, "%s out of range", name);
    return -1;
  }
  *out = (uint64_t) v;
  return 0;
}

static int
parse_hash (PyObject *o, int *alg)
{
  const char *h;
  if (!PyUnicode_Check (o)) {
    PyErr_SetString (PyExc_TypeError, "hash must be a str");
    return -1;
  }
  h = PyUnicode_AsUTF8 (o);
  if (h == NULL)
    return -1;
  if (strcmp (h, "xxh128") == 0)
    *alg = BS_HASH_XXH128;
  else if (strcmp (h, "blake2b") == 0)
    *alg = BS_HASH_BLAKE2B;
  else if (strcmp (h, "none") == 0)
    *alg = BS_HASH_NONE;
  else {
    PyErr_Format (PyExc_ValueError,
                  "unknown hash %R (expected 'xxh128', 'blake2b' or 'none')",
                  o);
    return -1;
  }
  return 0;
}

static int
check_block_size (uint64_t bs)
{
  if (bs < MIN_BLOCK || bs > MAX_BLOCK || (bs & (bs - 1)) != 0) {
    PyErr_Format (PyExc_ValueError,
                  "block_size must be a power of two between %llu and %llu",
                  (unsigned long long) MIN_BLOCK,
                  (unsigned long long) MAX_BLOCK);
    return -1;
  }
  return 0;
}

/* Sequence of (offset, length[, zero]) -> array.  Returns -1 on error. */
static int
parse_extents (PyObject *seq, uint64_t disk_size, bs_extent **out,
               size_t *nout)
{
  PyObject *fast = PySequence_Fast (seq, "extents must be a sequence");
  Py_ssize_t n, i;
  bs_extent *v;

  if (fast == NULL)
    return -1;
  n = PySequence_Fast_GET_SIZE (fast);
  v = PyMem_Malloc ((n ? n : 1) * sizeof *v);
  if (v == NULL) {
    Py_DECREF (fast);
    PyErr_NoMemory ();
    return -1;
  }
  for (i = 0; i < n; i++) {
    PyObject *it = PySequence_Fast_GET_ITEM (fast, i);
    PyObject *f;
    Py_ssize_t k;
    if (!PyTuple_Check (it) && !PyList_Check (it)) {
      PyErr_Format (PyExc_TypeError,
                    "extent %zd must be a tuple (offset, length[, zero])", i);
      goto fail;
    }
    f = PySequence_Fast (it, "extent");
    if (f == NULL)
      goto fail;
    k = PySequence_Fast_GET_SIZE (f);
    if (k != 2 && k != 3) {
      Py_DECREF (f);
      PyErr_Format (PyExc_TypeError,
                    "extent %zd must have 2 or 3 items", i);
      goto fail;
    }
    if (get_u64 (PySequence_Fast_GET_ITEM (f, 0), "extent offset",
                 &v[i].off) == -1 ||
        get_u64 (PySequence_Fast_GET_ITEM (f, 1), "extent length",
                 &v[i].len) == -1) {
      Py_DECREF (f);
      goto fail;
    }
    v[i].zero = 0;
    if (k == 3) {
      int z = PyObject_IsTrue (PySequence_Fast_GET_ITEM (f, 2));
      if (z < 0) {
        Py_DECREF (f);
        goto fail;
      }
      v[i].zero = z;
    }
    Py_DECREF (f);
    if (v[i].off > disk_size || v[i].len > disk_size - v[i].off) {
      PyErr_Format (PyExc_ValueError,
                    "extent %zd (offset=%llu length=%llu) ends beyond "
                    "disk_size %llu", i, (unsigned long long) v[i].off,
                    (unsigned long long) v[i].len,
                    (unsigned long long) disk_size);
      goto fail;
    }
  }
  Py_DECREF (fast);
  *out = v;
  *nout = n;
  return 0;
 fail:
  Py_DECREF (fast);
  PyMem_Free (v);
  return -1;
}

static PyObject *
raise_error (const bs_error *e, int cancelled)
{
  PyObject *cls = cancelled ? CancelledClass : ErrorClass;
  PyObject *args = NULL, *kw = NULL, *exc = NULL, *extent;
  const char *ep = e->endpoint == BS_EP_SOURCE ? "source" :
                   e->endpoint == BS_EP_DESTINATION ? "destination" : NULL;

  if (cls == NULL) {
    PyErr_SetString (PyExc_RuntimeError, e->message);
    return NULL;
  }
  if (e->has_extent)
    extent = Py_BuildValue ("(KK)", (unsigned long long) e->off,
                            (unsigned long long) e->len);
  else {
    extent = Py_None;
    Py_INCREF (extent);
  }
  if (extent == NULL)
    return NULL;
  args = Py_BuildValue ("(s)", e->message);
  kw = Py_BuildValue ("{s:N,s:s,s:i,s:z}", "extent", extent, "nbd_error",
                      e->nbd_error, "errno", e->err, "endpoint", ep);
  if (args && kw)
    exc = PyObject_Call (cls, args, kw);
  if (exc) {
    PyErr_SetObject ((PyObject *) Py_TYPE (exc), exc);
    Py_DECREF (exc);
  }
  Py_XDECREF (args);
  Py_XDECREF (kw);
  return NULL;
}

/* ---- Stream ---- */

typedef struct {
  PyObject_HEAD
  bs_stream *s;
  bs_config cfg;
} StreamObject;

static void
Stream_dealloc (StreamObject *self)
{
  bs_stream_free (self->s);
  Py_TYPE (self)->tp_free ((PyObject *) self);
}

static int
Stream_init (StreamObject *self, PyObject *args, PyObject *kwds)
{
  static char *kwlist[] = {
    "source", "destination", "extents", "disk_size", "block_size", "hash",
    "compare", "max_request", "connections", "in_flight", "rate_limit",
    "allow_trim", "start_offset", "flush_interval", "flush_seconds", NULL
  };
  PyObject *src, *dst = Py_None, *extents, *o_disk, *o_bs = NULL;
  PyObject *o_hash = NULL, *o_maxreq = NULL, *o_conn = NULL, *o_inf = NULL;
  PyObject *o_rate = Py_None, *o_start = NULL, *o_flush = NULL;
  int compare = 0, allow_trim = 0;
  double flush_seconds = 0;
  bs_config cfg;
  uint64_t v;
  bs_extent *ext = NULL;
  size_t next = 0, nseg = 0;
  bs_segment *segs = NULL;

  if (self->s != NULL) {
    PyErr_SetString (PyExc_RuntimeError, "Stream already initialised");
    return -1;
  }
  if (!PyArg_ParseTupleAndKeywords (args, kwds, "UOOO|OOpOOOOpOOd", kwlist,
                                    &src, &dst, &extents, &o_disk, &o_bs,
                                    &o_hash, &compare, &o_maxreq, &o_conn,
                                    &o_inf, &o_rate, &allow_trim, &o_start,
                                    &o_flush, &flush_seconds))
    return -1;
  memset (&cfg, 0, sizeof cfg);
  cfg.src_uri = PyUnicode_AsUTF8 (src);
  if (cfg.src_uri == NULL)
    return -1;
  if (dst != Py_None) {
    if (!PyUnicode_Check (dst)) {
      PyErr_SetString (PyExc_TypeError, "destination must be a str or None");
      return -1;
    }
    cfg.dst_uri = PyUnicode_AsUTF8 (dst);
    if (cfg.dst_uri == NULL)
      return -1;
  }
  if (get_u64 (o_disk, "disk_size", &cfg.disk_size) == -1)
    return -1;
  cfg.block_size = 65536;
  if (o_bs && get_u64 (o_bs, "block_size", &cfg.block_size) == -1)
    return -1;
  if (check_block_size (cfg.block_size) == -1)
    return -1;
  cfg.hash = BS_HASH_XXH128;
  if (o_hash && parse_hash (o_hash, &cfg.hash) == -1)
    return -1;
  cfg.compare = compare;
  if (compare && cfg.hash == BS_HASH_NONE) {
    PyErr_SetString (PyExc_ValueError, "compare needs a hash");
    return -1;
  }
  cfg.max_request = 4 << 20;
  if (o_maxreq && get_u64 (o_maxreq, "max_request", &cfg.max_request) == -1)
    return -1;
  if (cfg.max_request < MIN_REQUEST || cfg.max_request > MAX_REQUEST) {
    PyErr_Format (PyExc_ValueError, "max_request must be between %llu and %llu",
                  (unsigned long long) MIN_REQUEST,
                  (unsigned long long) MAX_REQUEST);
    return -1;
  }
  v = 4;
  if (o_conn && get_u64 (o_conn, "connections", &v) == -1)
    return -1;
  if (v < 1 || v > MAX_CONNECTIONS) {
    PyErr_Format (PyExc_ValueError, "connections must be between 1 and %d",
                  MAX_CONNECTIONS);
    return -1;
  }
  cfg.connections = (int) v;
  v = 16;
  if (o_inf && get_u64 (o_inf, "in_flight", &v) == -1)
    return -1;
  if (v < 1 || v > MAX_IN_FLIGHT) {
    PyErr_Format (PyExc_ValueError, "in_flight must be between 1 and %d",
                  MAX_IN_FLIGHT);
    return -1;
  }
  cfg.in_flight = (int) v;
  if ((uint64_t) cfg.connections * cfg.in_flight * cfg.max_request >
      MAX_BUFFERS) {
    PyErr_Format (PyExc_ValueError,
                  "connections * in_flight * max_request must not exceed "
                  "%llu bytes of buffers", (unsigned long long) MAX_BUFFERS);
    return -1;
  }
  cfg.rate_limit = 0;
  if (o_rate != Py_None) {
    if (get_u64 (o_rate, "rate_limit", &cfg.rate_limit) == -1)
      return -1;
    if (cfg.rate_limit == 0) {
      PyErr_SetString (PyExc_ValueError,
                       "rate_limit must be positive (or None)");
      return -1;
    }
  }
  cfg.allow_trim = allow_trim;
  cfg.start_offset = 0;
  if (o_start && get_u64 (o_start, "start_offset", &cfg.start_offset) == -1)
    return -1;
  if (cfg.start_offset > cfg.disk_size ||
      (cfg.start_offset % cfg.block_size != 0 &&
       cfg.start_offset != cfg.disk_size)) {
    PyErr_SetString (PyExc_ValueError,
                     "start_offset must be a multiple of block_size and "
                     "not beyond disk_size");
    return -1;
  }
  cfg.flush_interval = 256 << 20;
  if (o_flush && get_u64 (o_flush, "flush_interval",
                          &cfg.flush_interval) == -1)
    return -1;
  if (cfg.flush_interval == 0) {
    PyErr_SetString (PyExc_ValueError, "flush_interval must be positive");
    return -1;
  }
  if (!(flush_seconds >= 0)) {
    PyErr_SetString (PyExc_ValueError, "flush_seconds must be >= 0");
    return -1;
  }
  cfg.flush_seconds = flush_seconds;

  if (parse_extents (extents, cfg.disk_size, &ext, &next) == -1)
    return -1;
  if (bs_normalize (ext, next, cfg.disk_size, cfg.block_size,
                    cfg.start_offset, &segs, &nseg) == -1) {
    PyMem_Free (ext);
    if (errno == ENOMEM)
      PyErr_NoMemory ();
    else
      PyErr_SetString (PyExc_ValueError, "invalid extent list");
    return -1;
  }
  PyMem_Free (ext);
  self->s = bs_stream_new (&cfg, segs, nseg);
  if (self->s == NULL) {
    free (segs);
    PyErr_NoMemory ();
    return -1;
  }
  self->cfg = cfg;
  self->cfg.src_uri = self->cfg.dst_uri = NULL;  /* owned by the engine */
  return 0;
}

static PyObject *
progress_tuple (bs_stream *s)
{
  bs_progress p;
  bs_stream_progress (s, &p);
  return Py_BuildValue ("(KKKKKKKKdOKK)",
                        (unsigned long long) p.bytes_read,
                        (unsigned long long) p.bytes_written,
                        (unsigned long long) p.bytes_zero,
                        (unsigned long long) p.bytes_skipped,
                        (unsigned long long) p.bytes_total,
                        (unsigned long long) p.extents_done,
                        (unsigned long long) p.extents_total,
                        (unsigned long long) p.durable_offset,
                        p.rate, p.done ? Py_True : Py_False,
                        (unsigned long long) p.read_durable,
                        (unsigned long long) p.written_durable);
}

static int
ready (StreamObject *self)
{
  if (self->s == NULL) {
    PyErr_SetString (PyExc_RuntimeError, "Stream not initialised");
    return 0;
  }
  return 1;
}

static PyObject *
Stream_run (StreamObject *self, PyObject *args, PyObject *kwds)
{
  static char *kwlist[] = { "manifest", NULL };
  PyObject *manifest = Py_None;
  Py_buffer view;
  int have = 0, rc;
  bs_error err;
  uint64_t need;

  if (!ready (self))
    return NULL;
  if (!PyArg_ParseTupleAndKeywords (args, kwds, "|O", kwlist, &manifest))
    return NULL;
  if (manifest != Py_None) {
    if (self->cfg.hash == BS_HASH_NONE) {
      PyErr_SetString (PyExc_ValueError,
                       "hash='none' cannot fill a manifest");
      return NULL;
    }
    if (PyObject_GetBuffer (manifest, &view,
                            PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) == -1) {
      PyErr_Clear ();
      PyErr_SetString (PyExc_TypeError,
                       "manifest must be a writable buffer (bytearray)");
      return NULL;
    }
    have = 1;
    need = (self->cfg.disk_size + self->cfg.block_size - 1) /
           self->cfg.block_size * BS_HASH_SIZE;
    if ((uint64_t) view.len != need) {
      PyBuffer_Release (&view);
      PyErr_Format (PyExc_ValueError,
                    "manifest must be manifest_size(disk_size, block_size) "
                    "= %llu bytes, not %zd", (unsigned long long) need,
                    view.len);
      return NULL;
    }
  }
  else if (self->cfg.compare) {
    PyErr_SetString (PyExc_ValueError, "compare needs a manifest");
    return NULL;
  }

  Py_BEGIN_ALLOW_THREADS
  rc = bs_stream_run (self->s, have ? view.buf : NULL,
                      have ? (size_t) view.len : 0, &err);
  Py_END_ALLOW_THREADS

  if (have)
    PyBuffer_Release (&view);
  if (rc == BS_CANCELLED)
    return raise_error (&err, 1);
  if (rc != BS_OK)
    return raise_error (&err, 0);
  return progress_tuple (self->s);
}

static PyObject *
Stream_cancel (StreamObject *self, PyObject *unused)
{
  (void) unused;
  if (!ready (self))
    return NULL;
  bs_stream_cancel (self->s);
  Py_RETURN_NONE;
}

static PyObject *
Stream_set_rate_limit (StreamObject *self, PyObject *arg)
{
  uint64_t v = 0;
  if (!ready (self))
    return NULL;
  if (arg != Py_None) {
    if (get_u64 (arg, "rate_limit", &v) == -1)
      return NULL;
    if (v == 0) {
      PyErr_SetString (PyExc_ValueError,
                       "rate_limit must be positive (or None)");
      return NULL;
    }
  }
  bs_stream_set_rate (self->s, v);
  Py_RETURN_NONE;
}

static PyObject *
Stream_progress (StreamObject *self, PyObject *unused)
{
  (void) unused;
  if (!ready (self))
    return NULL;
  return progress_tuple (self->s);
}

static PyMethodDef Stream_methods[] = {
  { "run", (PyCFunction) (void (*) (void)) Stream_run,
    METH_VARARGS | METH_KEYWORDS, "run(manifest=None) -> progress tuple" },
  { "cancel", (PyCFunction) Stream_cancel, METH_NOARGS, "cancel()" },
  { "set_rate_limit", (PyCFunction) Stream_set_rate_limit, METH_O,
    "set_rate_limit(bytes_per_s or None)" },
  { "progress", (PyCFunction) Stream_progress, METH_NOARGS,
    "progress() -> tuple" },
  { NULL }
};

static PyTypeObject StreamType = {
  PyVarObject_HEAD_INIT (NULL, 0)
  .tp_name = "blockstream._blockstream.Stream",
  .tp_basicsize = sizeof (StreamObject),
  .tp_dealloc = (destructor) Stream_dealloc,
  .tp_flags = Py_TPFLAGS_DEFAULT,
  .tp_doc = "C copy engine (use blockstream.Stream)",
  .tp_methods = Stream_methods,
  .tp_init = (initproc) Stream_init,
  .tp_new = PyType_GenericNew,
};

/* ---- functions ---- */

static PyObject *
mod_set_error_classes (PyObject *m, PyObject *args)
{
  PyObject *e, *c;
  (void) m;
  if (!PyArg_ParseTuple (args, "OO", &e, &c))
    return NULL;
  if (!PyType_Check (e) || !PyType_Check (c)) {
    PyErr_SetString (PyExc_TypeError, "exception classes expected");
    return NULL;
  }
  Py_INCREF (e);
  Py_INCREF (c);
  Py_XSETREF (ErrorClass, e);
  Py_XSETREF (CancelledClass, c);
  Py_RETURN_NONE;
}

static PyObject *
mod_normalize (PyObject *m, PyObject *args, PyObject *kwds)
{
  static char *kwlist[] = { "extents", "disk_size", "block_size",
                            "start_offset", NULL };
  PyObject *extents, *o_disk, *o_bs, *o_start = NULL, *list;
  uint64_t disk, bs, start = 0;
  bs_extent *ext;
  bs_segment *segs;
  size_t n, nseg, i;
  (void) m;

  if (!PyArg_ParseTupleAndKeywords (args, kwds, "OOO|O", kwlist, &extents,
                                    &o_disk, &o_bs, &o_start))
    return NULL;
  if (get_u64 (o_disk, "disk_size", &disk) == -1 ||
      get_u64 (o_bs, "block_size", &bs) == -1 ||
      (o_start && get_u64 (o_start, "start_offset", &start) == -1))
    return NULL;
  if (check_block_size (bs) == -1)
    return NULL;
  if (start > disk || (start % bs && start != disk)) {
    PyErr_SetString (PyExc_ValueError, "bad start_offset");
    return NULL;
  }
  if (parse_extents (extents, disk, &ext, &n) == -1)
    return NULL;
  if (bs_normalize (ext, n, disk, bs, start, &segs, &nseg) == -1) {
    PyMem_Free (ext);
    return PyErr_NoMemory ();
  }
  PyMem_Free (ext);
  list = PyList_New (nseg);
  for (i = 0; list && i < nseg; i++) {
    PyObject *t = Py_BuildValue ("(KKO)", (unsigned long long) segs[i].start,
                                 (unsigned long long) segs[i].end,
                                 segs[i].zero ? Py_True : Py_False);
    if (t == NULL) {
      Py_CLEAR (list);
      break;
    }
    PyList_SET_ITEM (list, i, t);
  }
  free (segs);
  return list;
}

static PyObject *
mod_hash_blocks (PyObject *m, PyObject *args, PyObject *kwds)
{
  static char *kwlist[] = { "data", "block_size", "hash", NULL };
  Py_buffer data;
  PyObject *o_bs, *o_hash = NULL, *out = NULL;
  uint64_t bs;
  int alg = BS_HASH_XXH128, fail = 0;
  bs_hasher h;
  (void) m;

  if (!PyArg_ParseTupleAndKeywords (args, kwds, "y*O|O", kwlist, &data,
                                    &o_bs, &o_hash))
    return NULL;
  if (get_u64 (o_bs, "block_size", &bs) == -1 ||
      (o_hash && parse_hash (o_hash, &alg) == -1))
    goto done;
  if (bs == 0) {
    PyErr_SetString (PyExc_ValueError, "block_size must be positive");
    goto done;
  }
  if (alg == BS_HASH_NONE) {
    PyErr_SetString (PyExc_ValueError, "hash_blocks needs a real hash");
    goto done;
  }
  uint64_t nb = ((uint64_t) data.len + bs - 1) / bs, i;
  out = PyBytes_FromStringAndSize (NULL, (Py_ssize_t) (nb * BS_HASH_SIZE));
  if (out == NULL)
    goto done;
  uint8_t *o = (uint8_t *) PyBytes_AS_STRING (out);
  const uint8_t *p = data.buf;
  uint64_t len = data.len;
  Py_BEGIN_ALLOW_THREADS
  if (bs_hasher_init (&h, alg) == -1)
    fail = 1;
  for (i = 0; !fail && i < nb; i++) {
    uint64_t bl = len - i * bs < bs ? len - i * bs : bs;
    if (bs_hash (&h, p + i * bs, bl, o + i * BS_HASH_SIZE) == -1)
      fail = 1;
  }
  bs_hasher_free (&h);
  Py_END_ALLOW_THREADS
  if (fail) {
    Py_CLEAR (out);
    PyErr_SetString (PyExc_RuntimeError, "hashing failed (libcrypto)");
  }
 done:
  PyBuffer_Release (&data);
  return out;
}

static PyObject *
mod_zero_manifest (PyObject *m, PyObject *args, PyObject *kwds)
{
  static char *kwlist[] = { "disk_size", "block_size", "hash", NULL };
  PyObject *o_disk, *o_bs = NULL, *o_hash = NULL, *out;
  uint64_t disk, bs = 65536, i, nb, tail;
  int alg = BS_HASH_XXH128;
  uint8_t full[BS_HASH_SIZE], part[BS_HASH_SIZE];
  (void) m;

  if (!PyArg_ParseTupleAndKeywords (args, kwds, "O|OO", kwlist, &o_disk,
                                    &o_bs, &o_hash))
    return NULL;
  if (get_u64 (o_disk, "disk_size", &disk) == -1 ||
      (o_bs && get_u64 (o_bs, "block_size", &bs) == -1) ||
      (o_hash && parse_hash (o_hash, &alg) == -1))
    return NULL;
  if (check_block_size (bs) == -1)
    return NULL;
  if (alg == BS_HASH_NONE) {
    PyErr_SetString (PyExc_ValueError, "zero_manifest needs a real hash");
    return NULL;
  }
  nb = (disk + bs - 1) / bs;
  if (nb > (uint64_t) PY_SSIZE_T_MAX / BS_HASH_SIZE)
    return PyErr_NoMemory ();
  tail = disk % bs;
  if (bs_zero_hash (alg, bs, full) == -1 ||
      (tail && bs_zero_hash (alg, tail, part) == -1))
    return PyErr_NoMemory ();
  out = PyByteArray_FromStringAndSize (NULL, (Py_ssize_t) (nb * BS_HASH_SIZE));
  if (out == NULL)
    return NULL;
  uint8_t *o = (uint8_t *) PyByteArray_AS_STRING (out);
  Py_BEGIN_ALLOW_THREADS
  for (i = 0; i < nb; i++)
    memcpy (o + i * BS_HASH_SIZE, (tail && i == nb - 1) ? part : full,
            BS_HASH_SIZE);
  Py_END_ALLOW_THREADS
  return out;
}

static PyObject *
mod_zstd_compress (PyObject *m, PyObject *args)
{
  Py_buffer data;
  int level = 3;
  PyObject *out = NULL;
  size_t cap, r = 0;
  ZSTD_CCtx *cx;
  (void) m;

  if (!PyArg_ParseTuple (args, "y*|i", &data, &level))
    return NULL;
  cap = ZSTD_compressBound (data.len);
  out = PyBytes_FromStringAndSize (NULL, cap);
  cx = ZSTD_createCCtx ();
  if (out == NULL)
    goto done;
  if (cx == NULL) {
    Py_CLEAR (out);
    PyErr_NoMemory ();
    goto done;
  }
  char *dst = PyBytes_AS_STRING (out);
  Py_BEGIN_ALLOW_THREADS
  ZSTD_CCtx_setParameter (cx, ZSTD_c_compressionLevel, level);
  ZSTD_CCtx_setParameter (cx, ZSTD_c_checksumFlag, 1);
  ZSTD_CCtx_setParameter (cx, ZSTD_c_contentSizeFlag, 1);
  r = ZSTD_compress2 (cx, dst, cap, data.buf, data.len);
  Py_END_ALLOW_THREADS
  if (ZSTD_isError (r)) {
    Py_CLEAR (out);
    PyErr_Format (PyExc_ValueError, "zstd: %s", ZSTD_getErrorName (r));
    goto done;
  }
  if (_PyBytes_Resize (&out, r) == -1)
    out = NULL;
 done:
  if (cx)
    ZSTD_freeCCtx (cx);
  PyBuffer_Release (&data);
  return out;
}

static PyObject *
mod_zstd_decompress (PyObject *m, PyObject *args)
{
  Py_buffer data;
  unsigned long long want;
  PyObject *out = NULL;
  size_t r = 0;
  (void) m;

  if (!PyArg_ParseTuple (args, "y*K", &data, &want))
    return NULL;
  unsigned long long fs = ZSTD_getFrameContentSize (data.buf, data.len);
  size_t csize = ZSTD_findFrameCompressedSize (data.buf, data.len);
  if (fs == ZSTD_CONTENTSIZE_ERROR || fs == ZSTD_CONTENTSIZE_UNKNOWN ||
      ZSTD_isError (csize) || csize != (size_t) data.len || fs != want ||
      want > (unsigned long long) PY_SSIZE_T_MAX) {
    PyErr_SetString (PyExc_ValueError,
                     "zstd frame is corrupt or has the wrong size");
    goto done;
  }
  out = PyBytes_FromStringAndSize (NULL, (Py_ssize_t) want);
  if (out == NULL)
    goto done;
  char *dst = PyBytes_AS_STRING (out);
  Py_BEGIN_ALLOW_THREADS
  r = ZSTD_decompress (dst, want, data.buf, data.len);
  Py_END_ALLOW_THREADS
  if (ZSTD_isError (r) || r != want) {
    Py_CLEAR (out);
    PyErr_Format (PyExc_ValueError, "zstd: %s",
                  ZSTD_isError (r) ? ZSTD_getErrorName (r) : "short frame");
  }
 done:
  PyBuffer_Release (&data);
  return out;
}

static PyObject *
mod_xxh64 (PyObject *m, PyObject *args)
{
  Py_buffer data;
  unsigned long long seed = 0;
  uint64_t h;
  (void) m;
  if (!PyArg_ParseTuple (args, "y*|K", &data, &seed))
    return NULL;
  h = bs_xxh64 (data.buf, data.len, seed);
  PyBuffer_Release (&data);
  return PyLong_FromUnsignedLongLong (h);
}

static PyObject *
mod_block_status (PyObject *m, PyObject *args)
{
  const char *uri, *context;
  unsigned long long limit = 0;
  bs_bsentry *v = NULL;
  size_t n = 0, i;
  uint64_t size = 0;
  bs_error err;
  int missing = 0, rc;
  PyObject *list;
  (void) m;

  if (!PyArg_ParseTuple (args, "ss|K", &uri, &context, &limit))
    return NULL;
  memset (&err, 0, sizeof err);
  Py_BEGIN_ALLOW_THREADS
  rc = bs_block_status (uri, context, limit, &v, &n, &size, &err, &missing);
  Py_END_ALLOW_THREADS
  if (rc == -1)
    return raise_error (&err, 0);
  list = PyList_New (n);
  for (i = 0; list && i < n; i++) {
    PyObject *t = Py_BuildValue ("(KKI)", (unsigned long long) v[i].off,
                                 (unsigned long long) v[i].len,
                                 (unsigned int) v[i].flags);
    if (t == NULL) {
      Py_CLEAR (list);
      break;
    }
    PyList_SET_ITEM (list, i, t);
  }
  free (v);
  if (list == NULL)
    return NULL;
  return Py_BuildValue ("(NK)", list, (unsigned long long) size);
}

static PyMethodDef module_methods[] = {
  { "_set_error_classes", mod_set_error_classes, METH_VARARGS, NULL },
  { "normalize", (PyCFunction) (void (*) (void)) mod_normalize,
    METH_VARARGS | METH_KEYWORDS,
    "normalize(extents, disk_size, block_size, start_offset=0) -> "
    "[(start, end, zero)]" },
  { "hash_blocks", (PyCFunction) (void (*) (void)) mod_hash_blocks,
    METH_VARARGS | METH_KEYWORDS, "hash_blocks(data, block_size, hash)" },
  { "zero_manifest", (PyCFunction) (void (*) (void)) mod_zero_manifest,
    METH_VARARGS | METH_KEYWORDS, "zero_manifest(disk_size, block_size, hash)" },
  { "zstd_compress", mod_zstd_compress, METH_VARARGS, NULL },
  { "zstd_decompress", mod_zstd_decompress, METH_VARARGS, NULL },
  { "xxh64", mod_xxh64, METH_VARARGS, NULL },
  { "block_status", mod_block_status, METH_VARARGS,
    "block_status(uri, context, limit=0) -> ([(offset, length, flags)], "
    "export_size)" },
  { NULL }
};

static struct PyModuleDef moduledef = {
  PyModuleDef_HEAD_INIT, "blockstream._blockstream",
  "C engine of blockstream (private; use the blockstream package)", -1,
  module_methods
};

PyMODINIT_FUNC
PyInit__blockstream (void)
{
  PyObject *m;
  if (PyType_Ready (&StreamType) < 0)
    return NULL;
  m = PyModule_Create (&moduledef);
  if (m == NULL)
    return NULL;
  Py_INCREF (&StreamType);
  if (PyModule_AddObject (m, "Stream", (PyObject *) &StreamType) < 0) {
    Py_DECREF (&StreamType);
    Py_DECREF (m);
    return NULL;
  }
  PyModule_AddIntConstant (m, "HASH_SIZE", BS_HASH_SIZE);
  return m;
}
