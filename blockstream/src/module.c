/* blockstream._blockstream: Python binding of the C engine.
 *
 * The public, documented API is blockstream/__init__.py; this module is its
 * private back end and the one place where the arguments of Stream are
 * validated (the Python layer only converts Extent objects to tuples), so
 * that calling it directly with nonsense raises TypeError/ValueError instead
 * of crashing.
 *
 * Current CPython practice: multi-phase initialisation (PyModuleDef_Init and
 * a Py_mod_exec slot), Stream is a heap type made with
 * PyType_FromModuleAndSpec, and the module state holds that type and the
 * exception types BlockstreamError and Cancelled, which are created here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <zstd.h>

#include "bs.h"

typedef struct {
  PyObject *stream_type;
  PyObject *error;              /* blockstream.BlockstreamError */
  PyObject *cancelled;          /* blockstream.Cancelled */
} module_state;

static module_state *
state_of (PyObject *module)
{
  return (module_state *) PyModule_GetState (module);
}

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
      PyObject *z = PySequence_Fast_GET_ITEM (f, 2);
      if (!PyBool_Check (z)) {
        Py_DECREF (f);
        PyErr_Format (PyExc_TypeError, "extent %zd: zero must be a bool", i);
        goto fail;
      }
      v[i].zero = z == Py_True;
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
raise_error (module_state *st, const bs_error *e, int cancelled)
{
  PyObject *cls = cancelled ? st->cancelled : st->error;
  PyObject *args = NULL, *kw = NULL, *exc = NULL, *extent;
  const char *ep = e->endpoint == BS_EP_SOURCE ? "source" :
                   e->endpoint == BS_EP_DESTINATION ? "destination" : NULL;

  if (e->has_extent)
    extent = Py_BuildValue ("(KK)", (unsigned long long) e->off,
                            (unsigned long long) e->len);
  else
    extent = Py_NewRef (Py_None);
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

/* ---- the exception types ---- */

/* BlockstreamError(message, *, extent=None, nbd_error="", errno=0,
 * endpoint=None): the attributes live in the instance __dict__, so
 * BaseException's own __reduce__ (type, args, __dict__) pickles them. */
static int
error_init (PyObject *self, PyObject *args, PyObject *kwds)
{
  static char *kwlist[] = { "message", "extent", "nbd_error", "errno",
                            "endpoint", NULL };
  PyObject *message, *extent = Py_None, *nbd_error = NULL, *err = NULL;
  PyObject *endpoint = Py_None, *base_args;
  int rc;

  if (!PyArg_ParseTupleAndKeywords (args, kwds, "O|$OOOO", kwlist, &message,
                                    &extent, &nbd_error, &err, &endpoint))
    return -1;
  base_args = PyTuple_Pack (1, message);
  if (base_args == NULL)
    return -1;
  rc = ((PyTypeObject *) PyExc_Exception)->tp_init (self, base_args, NULL);
  Py_DECREF (base_args);
  if (rc < 0)
    return -1;
  PyObject *empty = NULL, *zero = NULL;
  if (nbd_error == NULL)
    nbd_error = empty = PyUnicode_FromString ("");
  if (err == NULL)
    err = zero = PyLong_FromLong (0);
  rc = (nbd_error && err &&
        PyObject_SetAttrString (self, "extent", extent) == 0 &&
        PyObject_SetAttrString (self, "nbd_error", nbd_error) == 0 &&
        PyObject_SetAttrString (self, "errno", err) == 0 &&
        PyObject_SetAttrString (self, "endpoint", endpoint) == 0) ? 0 : -1;
  Py_XDECREF (empty);
  Py_XDECREF (zero);
  return rc;
}

static PyType_Slot error_slots[] = {
  { Py_tp_init, error_init },
  { Py_tp_doc, (void *) PyDoc_STR (
      "A copy, hash or block-status operation failed.\n\n"
      "Attributes: extent (offset, length) of the failing NBD command or "
      "None, nbd_error (libnbd's text), errno, endpoint (\"source\", "
      "\"destination\" or None).") },
  { 0, NULL }
};

static PyType_Spec error_spec = {
  .name = "blockstream.BlockstreamError",
  .basicsize = 0,
  .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,  /* GC: inherited */
  .slots = error_slots,
};

/* ---- Stream ---- */

typedef struct {
  PyObject_HEAD
  bs_stream *s;
  bs_config cfg;
  PyObject *manifest;           /* writable buffer or NULL */
} StreamObject;

static int
Stream_traverse (StreamObject *self, visitproc visit, void *arg)
{
  Py_VISIT (Py_TYPE (self));
  Py_VISIT (self->manifest);
  return 0;
}

static int
Stream_clear (StreamObject *self)
{
  Py_CLEAR (self->manifest);
  return 0;
}

static void
Stream_dealloc (StreamObject *self)
{
  PyTypeObject *tp = Py_TYPE (self);
  PyObject_GC_UnTrack (self);
  Stream_clear (self);
  bs_stream_free (self->s);
  tp->tp_free ((PyObject *) self);
  Py_DECREF (tp);
}

static int
get_bool (PyObject *o, const char *name, int *out)
{
  if (o == NULL)
    return 0;
  if (!PyBool_Check (o)) {
    PyErr_Format (PyExc_TypeError, "%s must be a bool, not %.100s", name,
                  Py_TYPE (o)->tp_name);
    return -1;
  }
  *out = o == Py_True;
  return 0;
}

/* An int in [lo, hi]; the message names the range. */
static int
get_range (PyObject *o, const char *name, uint64_t lo, uint64_t hi,
           uint64_t *out)
{
  if (get_u64 (o, name, out) == -1) {
    if (PyErr_ExceptionMatches (PyExc_ValueError)) {
      PyErr_Clear ();
      PyErr_Format (PyExc_ValueError, "%s must be between %llu and %llu, "
                    "got %R", name, (unsigned long long) lo,
                    (unsigned long long) hi, o);
    }
    return -1;
  }
  if (*out < lo || *out > hi) {
    PyErr_Format (PyExc_ValueError, "%s must be between %llu and %llu, "
                  "got %llu", name, (unsigned long long) lo,
                  (unsigned long long) hi, (unsigned long long) *out);
    return -1;
  }
  return 0;
}

/* A finite number >= 0 (int or float, not bool). */
static int
get_seconds (PyObject *o, const char *name, double *out)
{
  if (o == NULL)
    return 0;
  if (PyBool_Check (o) || !(PyFloat_Check (o) || PyLong_Check (o))) {
    PyErr_Format (PyExc_ValueError, "%s must be a number >= 0, not %.100s",
                  name, Py_TYPE (o)->tp_name);
    return -1;
  }
  double v = PyFloat_AsDouble (o);
  if (v == -1 && PyErr_Occurred ())
    return -1;
  if (!(v >= 0) || !isfinite (v)) {
    PyErr_Format (PyExc_ValueError, "%s must be a number >= 0, got %R",
                  name, o);
    return -1;
  }
  *out = v;
  return 0;
}

static int
Stream_init (StreamObject *self, PyObject *args, PyObject *kwds)
{
  static char *kwlist[] = {
    "source", "destination", "extents", "disk_size", "block_size", "hash",
    "compare", "max_request", "connections", "in_flight", "rate_limit",
    "allow_trim", "start_offset", "flush_interval", "flush_seconds",
    "manifest", "connect_timeout", "request_timeout", "max_unflushed", NULL
  };
  PyObject *src, *dst = Py_None, *extents, *o_disk, *o_bs = NULL;
  PyObject *o_hash = NULL, *o_maxreq = NULL, *o_conn = NULL, *o_inf = NULL;
  PyObject *o_rate = Py_None, *o_start = NULL, *o_flush = NULL;
  PyObject *o_compare = NULL, *o_trim = NULL, *o_fsec = NULL;
  PyObject *o_manifest = Py_None, *o_ctime = NULL, *o_rtime = NULL;
  PyObject *o_unflushed = Py_None;
  bs_config cfg;
  uint64_t v;
  bs_extent *ext = NULL;
  size_t next = 0, nseg = 0;
  bs_segment *segs = NULL;

  if (self->s != NULL) {
    PyErr_SetString (PyExc_RuntimeError, "Stream already initialised");
    return -1;
  }
  if (!PyArg_ParseTupleAndKeywords (args, kwds, "OOOO|OOOOOOOOOOOOOOO",
                                    kwlist, &src, &dst, &extents, &o_disk,
                                    &o_bs, &o_hash, &o_compare, &o_maxreq,
                                    &o_conn, &o_inf, &o_rate, &o_trim,
                                    &o_start, &o_flush, &o_fsec, &o_manifest,
                                    &o_ctime, &o_rtime, &o_unflushed))
    return -1;
  memset (&cfg, 0, sizeof cfg);
  if (!PyUnicode_Check (src) || PyUnicode_GetLength (src) == 0) {
    PyErr_SetString (PyExc_TypeError,
                     "source must be a non-empty NBD URI string");
    return -1;
  }
  cfg.src_uri = PyUnicode_AsUTF8 (src);
  if (cfg.src_uri == NULL)
    return -1;
  if (dst != Py_None) {
    if (!PyUnicode_Check (dst) || PyUnicode_GetLength (dst) == 0) {
      PyErr_SetString (PyExc_TypeError,
                       "destination must be a non-empty NBD URI string "
                       "or None");
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
  if (get_bool (o_compare, "compare", &cfg.compare) == -1 ||
      get_bool (o_trim, "allow_trim", &cfg.allow_trim) == -1)
    return -1;
  if (o_manifest != Py_None) {
    Py_buffer view;
    uint64_t need;
    if (PyObject_GetBuffer (o_manifest, &view,
                            PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) == -1) {
      PyErr_Clear ();
      PyErr_SetString (PyExc_TypeError,
                       "manifest must be a bytearray (updated in place) "
                       "or None");
      return -1;
    }
    need = (cfg.disk_size + cfg.block_size - 1) / cfg.block_size *
           BS_HASH_SIZE;
    PyBuffer_Release (&view);
    if ((uint64_t) view.len != need) {
      PyErr_Format (PyExc_ValueError,
                    "manifest must be manifest_size(%llu, %llu) = %llu "
                    "bytes, got %zd", (unsigned long long) cfg.disk_size,
                    (unsigned long long) cfg.block_size,
                    (unsigned long long) need, view.len);
      return -1;
    }
    if (cfg.hash == BS_HASH_NONE) {
      PyErr_SetString (PyExc_ValueError,
                       "hash='none' is only allowed without a manifest");
      return -1;
    }
  }
  if (cfg.compare && o_manifest == Py_None) {
    PyErr_SetString (PyExc_ValueError,
                     "compare=True needs the destination's manifest");
    return -1;
  }
  cfg.max_request = 4 << 20;
  if (o_maxreq && get_range (o_maxreq, "max_request", MIN_REQUEST,
                             MAX_REQUEST, &cfg.max_request) == -1)
    return -1;
  v = 4;
  if (o_conn && get_range (o_conn, "connections", 1, MAX_CONNECTIONS, &v))
    return -1;
  cfg.connections = (int) v;
  v = 16;
  if (o_inf && get_range (o_inf, "in_flight", 1, MAX_IN_FLIGHT, &v))
    return -1;
  cfg.in_flight = (int) v;
  if ((uint64_t) cfg.connections * cfg.in_flight * cfg.max_request >
      MAX_BUFFERS) {
    PyErr_Format (PyExc_ValueError,
                  "connections * in_flight * max_request must not exceed "
                  "%llu bytes of buffers", (unsigned long long) MAX_BUFFERS);
    return -1;
  }
  cfg.rate_limit = 0;
  if (o_rate != Py_None &&
      get_range (o_rate, "rate_limit", 1, MAX_DISK, &cfg.rate_limit) == -1)
    return -1;
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
  if (o_flush && get_range (o_flush, "flush_interval", 1, MAX_DISK,
                            &cfg.flush_interval) == -1)
    return -1;
  cfg.connect_timeout = 30;
  cfg.request_timeout = 60;
  if (get_seconds (o_fsec, "flush_seconds", &cfg.flush_seconds) == -1 ||
      get_seconds (o_ctime, "connect_timeout", &cfg.connect_timeout) == -1 ||
      get_seconds (o_rtime, "request_timeout", &cfg.request_timeout) == -1)
    return -1;
  if (o_unflushed != Py_None &&
      get_range (o_unflushed, "max_unflushed", 1, MAX_DISK,
                 &cfg.max_unflushed) == -1)
    return -1;

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
  if (o_manifest != Py_None)
    self->manifest = Py_NewRef (o_manifest);
  return 0;
}

static PyObject *
progress_tuple (bs_stream *s)
{
  bs_progress p;
  bs_stream_progress (s, &p);
  return Py_BuildValue ("(KKKKKKKKdOKKiiO)",
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
                        (unsigned long long) p.written_durable,
                        p.connections, p.connections_dropped,
                        p.multi_conn ? Py_True : Py_False);
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
Stream_run (StreamObject *self, PyObject *unused)
{
  Py_buffer view;
  int have = 0, rc;
  bs_error err;
  (void) unused;

  if (!ready (self))
    return NULL;
  if (self->manifest) {
    /* checked in __init__; the object may have been resized since */
    if (PyObject_GetBuffer (self->manifest, &view,
                            PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) == -1)
      return NULL;
    have = 1;
  }

  Py_BEGIN_ALLOW_THREADS
  rc = bs_stream_run (self->s, have ? view.buf : NULL,
                      have ? (size_t) view.len : 0, &err);
  Py_END_ALLOW_THREADS

  if (have)
    PyBuffer_Release (&view);
  module_state *st = PyType_GetModuleState (Py_TYPE (self));
  if (st == NULL)
    return NULL;
  if (rc == BS_CANCELLED)
    return raise_error (st, &err, 1);
  if (rc != BS_OK)
    return raise_error (st, &err, 0);
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
  if (arg != Py_None &&
      get_range (arg, "rate_limit", 1, MAX_DISK, &v) == -1)
    return NULL;
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
  { "run", (PyCFunction) Stream_run, METH_NOARGS,
    "run() -> progress tuple" },
  { "cancel", (PyCFunction) Stream_cancel, METH_NOARGS, "cancel()" },
  { "set_rate_limit", (PyCFunction) Stream_set_rate_limit, METH_O,
    "set_rate_limit(bytes_per_s or None)" },
  { "progress", (PyCFunction) Stream_progress, METH_NOARGS,
    "progress() -> tuple" },
  { NULL }
};

static PyType_Slot stream_slots[] = {
  { Py_tp_dealloc, Stream_dealloc },
  { Py_tp_traverse, Stream_traverse },
  { Py_tp_clear, Stream_clear },
  { Py_tp_doc, (void *) PyDoc_STR ("C copy engine (use blockstream.Stream)") },
  { Py_tp_methods, Stream_methods },
  { Py_tp_init, Stream_init },
  { Py_tp_new, PyType_GenericNew },
  { 0, NULL }
};

static PyType_Spec stream_spec = {
  .name = "blockstream._blockstream.Stream",
  .basicsize = sizeof (StreamObject),
  .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
  .slots = stream_slots,
};

/* ---- functions ---- */

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
  /* a bytearray: the caller (unpack_manifest) hands it out as the mutable manifest,
   * and a terabyte's 256 MiB is not copied again to get one */
  out = PyByteArray_FromStringAndSize (NULL, (Py_ssize_t) want);
  if (out == NULL)
    goto done;
  char *dst = PyByteArray_AS_STRING (out);
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
  

  if (!PyArg_ParseTuple (args, "ss|K", &uri, &context, &limit))
    return NULL;
  memset (&err, 0, sizeof err);
  Py_BEGIN_ALLOW_THREADS
  rc = bs_block_status (uri, context, limit, &v, &n, &size, &err, &missing);
  Py_END_ALLOW_THREADS
  if (rc == -1)
    return raise_error (state_of (m), &err, 0);
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

static int
module_exec (PyObject *m)
{
  module_state *st = state_of (m);

  st->stream_type = PyType_FromModuleAndSpec (m, &stream_spec, NULL);
  if (st->stream_type == NULL ||
      PyModule_AddObjectRef (m, "Stream", st->stream_type) < 0)
    return -1;
  st->error = PyType_FromModuleAndSpec (m, &error_spec, PyExc_Exception);
  if (st->error == NULL ||
      PyModule_AddObjectRef (m, "BlockstreamError", st->error) < 0)
    return -1;
  st->cancelled = PyErr_NewExceptionWithDoc (
    "blockstream.Cancelled",
    "Stream.cancel() was called; progress() stays valid for a resume.",
    st->error, NULL);
  if (st->cancelled == NULL ||
      PyModule_AddObjectRef (m, "Cancelled", st->cancelled) < 0)
    return -1;
  if (PyModule_AddIntConstant (m, "HASH_SIZE", BS_HASH_SIZE) < 0)
    return -1;
  return 0;
}

static int
module_traverse (PyObject *m, visitproc visit, void *arg)
{
  module_state *st = state_of (m);
  Py_VISIT (st->stream_type);
  Py_VISIT (st->error);
  Py_VISIT (st->cancelled);
  return 0;
}

static int
module_clear (PyObject *m)
{
  module_state *st = state_of (m);
  Py_CLEAR (st->stream_type);
  Py_CLEAR (st->error);
  Py_CLEAR (st->cancelled);
  return 0;
}

static void
module_free (void *m)
{
  module_clear ((PyObject *) m);
}

static PyModuleDef_Slot module_slots[] = {
  { Py_mod_exec, module_exec },
  { 0, NULL }
};

static struct PyModuleDef moduledef = {
  PyModuleDef_HEAD_INIT,
  .m_name = "blockstream._blockstream",
  .m_doc = "C engine of blockstream (private; use the blockstream package)",
  .m_size = sizeof (module_state),
  .m_methods = module_methods,
  .m_slots = module_slots,
  .m_traverse = module_traverse,
  .m_clear = module_clear,
  .m_free = module_free,
};

PyMODINIT_FUNC
PyInit__blockstream (void)
{
  return PyModuleDef_Init (&moduledef);
}
