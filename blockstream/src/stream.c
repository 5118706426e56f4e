/* The copy engine: libnbd AIO, one thread per connection pair.
 *
 * Threading model
 * ---------------
 * run() spawns cfg.connections workers.  Worker i owns source handle i and
 * destination handle i and runs its own poll loop over both sockets plus an
 * eventfd used to wake it (cancel, rate change, flush round, end).  libnbd
 * invokes completion callbacks from inside nbd_aio_notify_* in the thread
 * that polls the handle, so every request is only ever touched by its
 * owning worker; the only shared state is struct bs_stream, guarded by
 * s->mu (never held while calling into libnbd) plus atomic counters.
 *
 * A request is a run of whole blocks: it is taken from the shared cursor
 * (ascending offsets), read (split into commands of at most max_io), then
 * classified per block (data / zero / skip), hashed, and written as runs
 * of pwrite / write_zeroes commands.
 *
 * Durability
 * ----------
 * W = lowest offset not yet completely written = the start of the oldest
 * issued-but-incomplete request, or the cursor when none is outstanding.
 * When flush_interval bytes were written since the last round (or, with
 * flush_seconds, some bytes and that much time: on a slow link the durable
 * offset still advances often, so a failed attempt resends little), a flush
 * round starts: W is snapshotted, every worker sends NBD_CMD_FLUSH on its
 * destination connection (the server may not advertise multi-conn), and
 * when all of them have replied the manifest entries of the requests
 * below the snapshot are stored into the caller's manifest and only then
 * durable_offset = snapshot is published.  The manifest therefore always
 * describes the destination below durable_offset and the caller's previous
 * state above it, which is what makes a compare-mode resume correct.
 *
 * Memory ownership
 * ----------------
 * Request slots and their buffers belong to the worker and are freed only
 * after every handle has been closed, so a late callback can never see
 * freed memory.  The per-command struct op is freed by libnbd through the
 * callback's .free (called exactly once, also when issuing fails).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <libnbd.h>

#include "bs.h"

#define ZERO_REQ_MAX (64ULL << 20)      /* write_zeroes requests, no buffer */
#define DEFAULT_MAX_IO (32ULL << 20)    /* when the server gives no maximum */
#define DRAIN_SECONDS 5.0               /* after stop: wait for replies */
#define RATE_WINDOW 2.0
#define RING 16

enum { CLS_DATA = 0, CLS_ZERO = 1, CLS_SKIP = 2 };
enum { STOP_NONE = 0, STOP_CANCEL = 1, STOP_ERROR = 2 };
enum { OP_READ, OP_WRITE, OP_ZERO, OP_FLUSH };

struct done_rec {
  struct done_rec *next;
  uint64_t off, len;
  uint64_t read, written;       /* bytes read from the source, data written */
  int zero;
  uint8_t hashes[];             /* nblocks * 16 unless zero */
};

struct worker;

struct req {
  struct worker *w;
  uint64_t seq, off, len;
  int zero;
  char *buf;
  uint8_t *cls;
  struct done_rec *rec;
  uint64_t to_write;            /* bytes that will be written (data+zero) */
  int pending;                  /* outstanding commands (+1 guard) */
  int failed;
  int busy;                     /* taken from the free list */
  struct req *prev, *next;      /* s->head..s->tail, under s->mu */
  struct req *link;             /* free list / ready list (worker-local) */
};

struct op {
  struct req *r;                /* NULL for flush */
  struct worker *w;
  int kind;
  uint64_t off, len;
  unsigned gen;                 /* flush round */
};

struct fail {
  int set, reported;
  int endpoint, kind, err;
  uint64_t off, len;
};

struct worker {
  bs_stream *s;
  int idx;
  pthread_t tid;
  int started;
  struct nbd_handle *src, *dst;
  int src_dead, dst_dead;
  int dst_can_zero, dst_can_flush;
  int src_cmds, dst_cmds;
  int efd;
  uint64_t max_io;
  struct req *slots;
  struct req *free_list, *ready_head, *ready_tail;
  unsigned flush_gen;
  bs_hasher hasher;
  struct fail fail;
  char handle_err[512];
  int handle_errno;
  int handle_err_side;
  int clean_exit;               /* left the loop with nothing outstanding */
  int joined;                   /* counted in s->active */
  double src_last, dst_last;    /* last reply (or first command) per connection */
};

struct bs_stream {
  bs_config cfg;
  char *src_uri, *dst_uri;
  bs_segment *segs;
  size_t nseg;
  uint64_t total_bytes;
  uint64_t final_end;
  uint64_t req_bytes, zero_req_bytes;
  size_t max_blocks;
  uint8_t zh_full[BS_HASH_SIZE], zh_tail[BS_HASH_SIZE];
  uint64_t tail_len;            /* disk_size % block_size */
  char *zerobuf;                /* for servers without write_zeroes */

  pthread_mutex_t mu;
  pthread_cond_t cv;            /* the first pair connected (or failed) */
  /* --- under mu --- */
  int primary;                  /* 0 connecting, 1 connected, -1 failed */
  int active;                   /* pairs connected and copying */
  int connected, dropped;       /* pairs that completed / gave up the handshake */
  int multi_conn;
  uint64_t unsaved;             /* data bytes taken and not yet below durable */
  char drop_reason[256];
  int ran, running;
  size_t cur_seg;
  uint64_t cur_off;
  uint64_t next_seq;
  struct req *head, *tail;
  uint64_t reqs_out;
  size_t seg_done_ptr;
  struct done_rec *recs;
  uint64_t bytes_since_flush;
  int round_active;
  double round_t;               /* when the last round started (or the run) */
  uint64_t round_w;
  int round_left;
  double rate;
  double tokens, tokens_t;
  double ring_t[RING];
  uint64_t ring_b[RING];
  int ring_n, ring_pos;
  double t_end;
  uint64_t processed;
  bs_error err;
  struct worker *workers;
  int nworkers;
  uint8_t *manifest;
  /* --- atomics --- */
  atomic_int stop;
  atomic_int cancel_requested;
  atomic_int finished;
  atomic_uint flush_gen;
  atomic_int closing;
  _Atomic uint64_t bytes_read, bytes_written, bytes_zero, bytes_skipped;
  _Atomic uint64_t extents_done, durable;
  /* bytes read / written by requests below durable: what a failed run
   * does not have to move again (bytes_read - read_durable must) */
  _Atomic uint64_t read_durable, written_durable;
  atomic_int done;
};

static double
now_s (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static const char *
ep_name (int ep)
{
  return ep == BS_EP_SOURCE ? "source" :
         ep == BS_EP_DESTINATION ? "destination" : "stream";
}

static const char *
op_name (int kind)
{
  switch (kind) {
  case OP_READ: return "read";
  case OP_WRITE: return "write";
  case OP_ZERO: return "write_zeroes";
  default: return "flush";
  }
}

static void
wake_all_locked (bs_stream *s)
{
  int i;
  uint64_t one = 1;
  for (i = 0; i < s->nworkers; i++)
    if (s->workers[i].efd >= 0) {
      ssize_t r = write (s->workers[i].efd, &one, sizeof one);
      (void) r;
    }
}

/* First error wins; also stops the stream. */
static void
set_error (bs_stream *s, int endpoint, int has_extent, uint64_t off,
           uint64_t len, int err, const char *nbd_error, const char *what)
{
  pthread_mutex_lock (&s->mu);
  if (!s->err.set) {
    bs_error *e = &s->err;
    e->set = 1;
    e->endpoint = endpoint;
    e->has_extent = has_extent;
    e->off = off;
    e->len = len;
    e->err = err;
    snprintf (e->nbd_error, sizeof e->nbd_error, "%s",
              nbd_error && *nbd_error ? nbd_error :
              err ? strerror (err) : "unknown error");
    if (has_extent)
      snprintf (e->message, sizeof e->message,
                "%s %s failed for extent offset=%" PRIu64 " length=%" PRIu64
                ": %s", ep_name (endpoint), what, off, len, e->nbd_error);
    else
      snprintf (e->message, sizeof e->message, "%s %s failed: %s",
                ep_name (endpoint), what, e->nbd_error);
  }
  int expected = STOP_NONE;
  atomic_compare_exchange_strong (&s->stop, &expected, STOP_ERROR);
  wake_all_locked (s);
  pthread_mutex_unlock (&s->mu);
}

/* ---------------------------------------------------------------- */

bs_stream *
bs_stream_new (const bs_config *cfg, bs_segment *segs, size_t nseg)
{
  bs_stream *s = calloc (1, sizeof *s);
  size_t i;

  if (s == NULL)
    return NULL;
  s->cfg = *cfg;
  s->src_uri = strdup (cfg->src_uri);
  s->dst_uri = cfg->dst_uri ? strdup (cfg->dst_uri) : NULL;
  if (!s->src_uri || (cfg->dst_uri && !s->dst_uri)) {
    free (s->src_uri);
    free (s->dst_uri);
    free (s);
    return NULL;
  }
  s->cfg.src_uri = s->src_uri;
  s->cfg.dst_uri = s->dst_uri;
  s->segs = segs;
  s->nseg = nseg;
  for (i = 0; i < nseg; i++)
    s->total_bytes += segs[i].end - segs[i].start;
  s->final_end = nseg ? segs[nseg - 1].end : cfg->start_offset;
  if (s->final_end < cfg->start_offset)
    s->final_end = cfg->start_offset;

  uint64_t bs = cfg->block_size;
  s->req_bytes = cfg->max_request / bs * bs;
  if (s->req_bytes < bs)
    s->req_bytes = bs;
  s->zero_req_bytes = ZERO_REQ_MAX / bs * bs;
  if (s->zero_req_bytes < s->req_bytes)
    s->zero_req_bytes = s->req_bytes;
  s->max_blocks = s->zero_req_bytes / bs;
  s->tail_len = cfg->disk_size % bs;

  pthread_mutex_init (&s->mu, NULL);
  pthread_cond_init (&s->cv, NULL);
  s->rate = (double) cfg->rate_limit;
  s->cur_seg = 0;
  s->cur_off = nseg ? segs[0].start : 0;
  atomic_store (&s->durable, cfg->start_offset);
  return s;
}

void
bs_stream_free (bs_stream *s)
{
  if (!s)
    return;
  pthread_mutex_destroy (&s->mu);
  pthread_cond_destroy (&s->cv);
  free (s->segs);
  free (s->src_uri);
  free (s->dst_uri);
  free (s);
}

void
bs_stream_cancel (bs_stream *s)
{
  pthread_mutex_lock (&s->mu);
  atomic_store (&s->cancel_requested, 1);
  int expected = STOP_NONE;
  atomic_compare_exchange_strong (&s->stop, &expected, STOP_CANCEL);
  if (s->running)
    wake_all_locked (s);
  pthread_mutex_unlock (&s->mu);
}

void
bs_stream_set_rate (bs_stream *s, uint64_t rate)
{
  pthread_mutex_lock (&s->mu);
  double old = s->rate;
  s->rate = (double) rate;
  if (rate > 0) {
    double burst = s->rate / 4;
    if (old <= 0 || s->tokens > burst)
      s->tokens = old <= 0 ? 0 : burst;
    s->tokens_t = now_s ();
  }
  if (s->running)
    wake_all_locked (s);
  pthread_mutex_unlock (&s->mu);
}

void
bs_stream_progress (bs_stream *s, bs_progress *p)
{
  pthread_mutex_lock (&s->mu);
  p->bytes_total = s->total_bytes;
  p->extents_total = s->nseg;
  double now = s->running || s->t_end == 0 ? now_s () : s->t_end;
  double rate = 0;
  if (s->ring_n > 0) {
    /* newest sample at least RATE_WINDOW old, else the oldest one */
    int i, best = -1;
    for (i = 0; i < s->ring_n; i++) {
      int k = (s->ring_pos - 1 - i + RING) % RING;
      best = k;
      if (now - s->ring_t[k] >= RATE_WINDOW)
        break;
    }
    double dt = now - s->ring_t[best];
    if (dt > 0.05)
      rate = (double) (s->processed - s->ring_b[best]) / dt;
  }
  p->rate = rate;
  p->connections = s->connected;
  p->connections_dropped = s->dropped;
  p->multi_conn = s->multi_conn;
  pthread_mutex_unlock (&s->mu);
  p->bytes_read = atomic_load (&s->bytes_read);
  p->bytes_written = atomic_load (&s->bytes_written);
  p->bytes_zero = atomic_load (&s->bytes_zero);
  p->bytes_skipped = atomic_load (&s->bytes_skipped);
  p->extents_done = atomic_load (&s->extents_done);
  p->durable_offset = atomic_load (&s->durable);
  p->read_durable = atomic_load (&s->read_durable);
  p->written_durable = atomic_load (&s->written_durable);
  p->done = atomic_load (&s->done);
}

/* ---------------------------------------------------------------- */
/* Shared-state helpers (call with s->mu held). */

static uint64_t
watermark_locked (bs_stream *s)
{
  if (s->head)
    return s->head->off;
  if (s->cur_seg >= s->nseg)
    return s->final_end;
  return s->cur_off;
}

static void
ring_sample_locked (bs_stream *s, double now)
{
  if (s->ring_n > 0 &&
      now - s->ring_t[(s->ring_pos - 1 + RING) % RING] < 0.25)
    return;
  s->ring_t[s->ring_pos] = now;
  s->ring_b[s->ring_pos] = s->processed;
  s->ring_pos = (s->ring_pos + 1) % RING;
  if (s->ring_n < RING)
    s->ring_n++;
}

static void
store_hashes (bs_stream *s, uint64_t off, uint64_t len, int zero,
              const uint8_t *hashes)
{
  uint64_t bs = s->cfg.block_size;
  uint64_t b0 = off / bs, nb = (len + bs - 1) / bs, i;
  uint8_t *m = s->manifest + b0 * BS_HASH_SIZE;

  if (!zero) {
    memcpy (m, hashes, nb * BS_HASH_SIZE);
    return;
  }
  for (i = 0; i < nb; i++) {
    uint64_t bo = (b0 + i) * bs;
    const uint8_t *h = (s->tail_len && bo + bs > s->cfg.disk_size) ?
      s->zh_tail : s->zh_full;
    memcpy (m + i * BS_HASH_SIZE, h, BS_HASH_SIZE);
  }
}

/* Store the manifest entries of completed requests below w, then publish
 * durable_offset = w (release: a reader that sees the new offset also sees
 * the entries). */
static void
publish_durable_locked (bs_stream *s, uint64_t w)
{
  struct done_rec **pp = &s->recs, *r;
  while ((r = *pp) != NULL) {
    if (r->off < w) {
      if (s->manifest)
        store_hashes (s, r->off, r->len, r->zero, r->hashes);
      if (!r->zero)
        s->unsaved -= r->len < s->unsaved ? r->len : s->unsaved;
      atomic_fetch_add (&s->read_durable, r->read);
      atomic_fetch_add (&s->written_durable, r->written);
      *pp = r->next;
      free (r);
    }
    else
      pp = &r->next;
  }
  if (w > atomic_load (&s->durable))
    atomic_store_explicit (&s->durable, w, memory_order_release);
  if (s->cfg.max_unflushed && s->running)
    wake_all_locked (s);        /* workers held back by max_unflushed */
}

static void
start_round_locked (bs_stream *s, uint64_t w)
{
  s->round_active = 1;
  s->round_t = now_s ();
  s->round_w = w;
  s->round_left = s->active;
  s->bytes_since_flush = 0;
  atomic_fetch_add (&s->flush_gen, 1);
  wake_all_locked (s);
}

static void
round_ack (bs_stream *s, unsigned gen)
{
  pthread_mutex_lock (&s->mu);
  if (s->round_active && gen == atomic_load (&s->flush_gen)) {
    if (--s->round_left == 0) {
      s->round_active = 0;
      if (atomic_load (&s->stop) == STOP_NONE)
        publish_durable_locked (s, s->round_w);
    }
  }
  pthread_mutex_unlock (&s->mu);
}

/* ---------------------------------------------------------------- */
/* Requests. */

enum { NR_OK, NR_WAIT, NR_DONE };

static int
next_request (bs_stream *s, struct req *r, int *wait_ms)
{
  int ret = NR_OK;
  pthread_mutex_lock (&s->mu);
  if (atomic_load (&s->stop) != STOP_NONE || s->cur_seg >= s->nseg) {
    ret = NR_DONE;
    goto out;
  }
  bs_segment *seg = &s->segs[s->cur_seg];
  uint64_t off = s->cur_off;
  uint64_t max = seg->zero ? s->zero_req_bytes : s->req_bytes;
  uint64_t len = seg->end - off < max ? seg->end - off : max;

  /* max_unflushed: what a failed run has to send again is what was taken
   * beyond durable_offset; hold new data requests back until a flush round
   * makes room (start one if none is running). */
  if (!seg->zero && s->cfg.dst_uri && s->cfg.max_unflushed && s->unsaved &&
      s->unsaved + len > s->cfg.max_unflushed) {
    if (!s->round_active && s->bytes_since_flush > 0 &&
        atomic_load (&s->stop) == STOP_NONE)
      start_round_locked (s, watermark_locked (s));
    ret = NR_WAIT;
    goto out;
  }
  if (!seg->zero && s->rate > 0) {
    double now = now_s (), burst = s->rate / 4;
    s->tokens += (now - s->tokens_t) * s->rate;
    s->tokens_t = now;
    if (s->tokens > burst)
      s->tokens = burst;
    if (s->tokens < 0) {
      double ms = ceil (-s->tokens / s->rate * 1000.0);
      *wait_ms = ms < 1 ? 1 : ms > 1000 ? 1000 : (int) ms;
      ret = NR_WAIT;
      goto out;
    }
    s->tokens -= (double) len;
  }

  if (!seg->zero && s->cfg.dst_uri)
    s->unsaved += len;
  r->seq = s->next_seq++;
  r->off = off;
  r->len = len;
  r->zero = seg->zero;
  r->pending = 0;
  r->failed = 0;
  r->to_write = 0;
  r->rec = NULL;
  s->cur_off += len;
  if (s->cur_off >= seg->end) {
    s->cur_seg++;
    if (s->cur_seg < s->nseg)
      s->cur_off = s->segs[s->cur_seg].start;
  }
  r->next = NULL;
  r->prev = s->tail;
  if (s->tail)
    s->tail->next = r;
  else
    s->head = r;
  s->tail = r;
  s->reqs_out++;
 out:
  pthread_mutex_unlock (&s->mu);
  return ret;
}

static void
release_slot (struct worker *w, struct req *r)
{
  r->busy = 0;
  r->link = w->free_list;
  w->free_list = r;
}

/* A request that will never complete (stop or failure): it stays in the
 * ordered list so the watermark can never pass it; its slot is not reused
 * because nothing new is issued after a stop. */
static void
abandon (struct worker *w, struct req *r)
{
  (void) w;
  free (r->rec);
  r->rec = NULL;
}

static void
complete_request (struct worker *w, struct req *r)
{
  bs_stream *s = w->s;
  double now = now_s ();

  pthread_mutex_lock (&s->mu);
  if (r->prev)
    r->prev->next = r->next;
  else
    s->head = r->next;
  if (r->next)
    r->next->prev = r->prev;
  else
    s->tail = r->prev;
  r->prev = r->next = NULL;
  s->reqs_out--;
  if (r->rec) {
    r->rec->next = s->recs;
    s->recs = r->rec;
    r->rec = NULL;
  }
  s->bytes_since_flush += r->to_write;
  s->processed += r->len;
  uint64_t wm = watermark_locked (s);
  while (s->seg_done_ptr < s->nseg && s->segs[s->seg_done_ptr].end <= wm)
    s->seg_done_ptr++;
  atomic_store (&s->extents_done, s->seg_done_ptr);
  ring_sample_locked (s, now);
  if (!s->cfg.dst_uri && atomic_load (&s->stop) == STOP_NONE)
    publish_durable_locked (s, wm);
  if (s->cur_seg >= s->nseg && s->reqs_out == 0) {
    atomic_store (&s->finished, 1);
    wake_all_locked (s);
  }
  else if (s->cfg.dst_uri && !s->round_active &&
           (s->bytes_since_flush >= s->cfg.flush_interval ||
            (s->cfg.flush_seconds > 0 && s->bytes_since_flush > 0 &&
             now - s->round_t >= s->cfg.flush_seconds)) &&
           atomic_load (&s->stop) == STOP_NONE)
    start_round_locked (s, wm);
  pthread_mutex_unlock (&s->mu);
  release_slot (w, r);
}

static void
note_fail (struct worker *w, int endpoint, int kind, uint64_t off,
           uint64_t len, int err)
{
  if (!w->fail.set) {
    w->fail.set = 1;
    w->fail.endpoint = endpoint;
    w->fail.kind = kind;
    w->fail.off = off;
    w->fail.len = len;
    w->fail.err = err;
  }
}

static void
push_ready (struct worker *w, struct req *r)
{
  r->link = NULL;
  if (w->ready_tail)
    w->ready_tail->link = r;
  else
    w->ready_head = r;
  w->ready_tail = r;
}

static void
write_finished (struct worker *w, struct req *r)
{
  if (r->failed || atomic_load (&w->s->stop) == STOP_ERROR)
    abandon (w, r);
  else
    complete_request (w, r);
}

/* libnbd completion callbacks (run inside nbd_aio_notify_* or nbd_aio_*
 * of the owning worker, with that handle's lock held: no nbd_* calls on
 * the same handle in here). */
static int
read_cb (void *ud, int *error)
{
  struct op *op = ud;
  struct worker *w = op->w;
  struct req *r = op->r;

  if (atomic_load (&w->s->closing))
    return 1;
  w->src_cmds--;
  w->src_last = now_s ();
  if (*error) {
    note_fail (w, BS_EP_SOURCE, OP_READ, op->off, op->len, *error);
    r->failed = 1;
  }
  else
    atomic_fetch_add (&w->s->bytes_read, op->len);
  if (--r->pending == 0)
    push_ready (w, r);
  return 1;
}

static int
write_cb (void *ud, int *error)
{
  struct op *op = ud;
  struct worker *w = op->w;
  struct req *r = op->r;

  if (atomic_load (&w->s->closing))
    return 1;
  w->dst_cmds--;
  w->dst_last = now_s ();
  if (*error) {
    note_fail (w, BS_EP_DESTINATION, op->kind, op->off, op->len, *error);
    r->failed = 1;
  }
  else if (op->kind == OP_ZERO)
    atomic_fetch_add (&w->s->bytes_zero, op->len);
  else
    atomic_fetch_add (&w->s->bytes_written, op->len);
  if (--r->pending == 0)
    write_finished (w, r);
  return 1;
}

static int
flush_cb (void *ud, int *error)
{
  struct op *op = ud;
  struct worker *w = op->w;
  bs_stream *s = w->s;

  if (atomic_load (&s->closing))
    return 1;
  w->dst_cmds--;
  w->dst_last = now_s ();
  if (*error) {
    uint64_t d = atomic_load (&s->durable);
    note_fail (w, BS_EP_DESTINATION, OP_FLUSH, d, op->off - d, *error);
  }
  else
    round_ack (s, op->gen);
  return 1;
}

static struct op *
new_op (struct worker *w, struct req *r, int kind, uint64_t off, uint64_t len)
{
  struct op *op = malloc (sizeof *op);
  if (op) {
    op->w = w;
    op->r = r;
    op->kind = kind;
    op->off = off;
    op->len = len;
    op->gen = 0;
  }
  return op;
}

/* Records an error for a failed nbd_aio_* call (issued by this worker).
 * When the handle died earlier (while idle), libnbd's text for this call
 * is only "invalid state": keep the text of the original failure too. */
static void
issue_failed (struct worker *w, int endpoint, int kind, uint64_t off,
              uint64_t len)
{
  const char *msg = nbd_get_error ();
  int err = nbd_get_errno ();
  char text[700];

  if (w->handle_err[0] && w->handle_err_side == endpoint) {
    snprintf (text, sizeof text, "%s (then: %s)", w->handle_err,
              msg ? msg : "");
    msg = text;
    if (w->handle_errno)
      err = w->handle_errno;
  }
  if (err == 0)
    err = ENOTCONN;
  set_error (w->s, endpoint, 1, off, len, err, msg, op_name (kind));
}

static void
start_request (struct worker *w, struct req *r)
{
  bs_stream *s = w->s;
  uint64_t o;

  if (r->cls == NULL) {
    r->cls = malloc (s->max_blocks);
    if (r->cls == NULL) {
      set_error (s, BS_EP_SOURCE, 1, r->off, r->len, ENOMEM,
                 "out of memory for request state", "read");
      abandon (w, r);
      return;
    }
  }
  if (r->zero) {
    push_ready (w, r);
    return;
  }
  if (r->buf == NULL) {
    r->buf = malloc (s->req_bytes);
    if (r->buf == NULL) {
      set_error (s, BS_EP_SOURCE, 1, r->off, r->len, ENOMEM,
                 "out of memory for request buffer", "read");
      abandon (w, r);
      return;
    }
  }
  r->pending = 1;               /* guard */
  for (o = 0; o < r->len; o += w->max_io) {
    uint64_t n = r->len - o < w->max_io ? r->len - o : w->max_io;
    struct op *op = new_op (w, r, OP_READ, r->off + o, n);
    if (op == NULL) {
      set_error (s, BS_EP_SOURCE, 1, r->off + o, n, ENOMEM,
                 "out of memory", "read");
      r->failed = 1;
      break;
    }
    if (nbd_aio_pread (w->src, r->buf + o, n, r->off + o,
                       (nbd_completion_callback) { .callback = read_cb,
                                                   .user_data = op,
                                                   .free = free },
                       0) == -1) {
      issue_failed (w, BS_EP_SOURCE, OP_READ, r->off + o, n);
      r->failed = 1;
      break;
    }
    r->pending++;
    if (w->src_cmds++ == 0)
      w->src_last = now_s ();
  }
  if (--r->pending == 0)
    push_ready (w, r);
}

/* Classify and hash every block of a request whose data is available (or
 * which is known zero).  Returns -1 on a hashing failure. */
static int
classify (struct worker *w, struct req *r)
{
  bs_stream *s = w->s;
  uint64_t bs = s->cfg.block_size;
  uint64_t nb = (r->len + bs - 1) / bs, i;
  int want_hash = s->manifest != NULL && s->cfg.hash != BS_HASH_NONE;
  uint8_t *hout = NULL;
  uint8_t tmp[BS_HASH_SIZE];
  uint64_t skipped = 0, zeros = 0;

  if (s->cfg.dst_uri) {
    /* Every copied request leaves a record until it is below durable: its
     * hashes (with a manifest) and what it moved (for the *_durable counts). */
    int keep_hashes = want_hash && !r->zero;
    r->rec = malloc (sizeof *r->rec + (keep_hashes ? nb * BS_HASH_SIZE : 0));
    if (r->rec == NULL)
      return -1;
    r->rec->next = NULL;
    r->rec->off = r->off;
    r->rec->len = r->len;
    r->rec->zero = r->zero;
    r->rec->read = r->zero ? 0 : r->len;
    r->rec->written = 0;
    if (keep_hashes)
      hout = r->rec->hashes;
  }
  else if (want_hash)
    hout = s->manifest + (r->off / bs) * BS_HASH_SIZE;  /* hash-only mode */

  r->to_write = 0;
  for (i = 0; i < nb; i++) {
    uint64_t bl = r->len - i * bs < bs ? r->len - i * bs : bs;
    const uint8_t *cur = s->manifest ?
      s->manifest + (r->off / bs + i) * BS_HASH_SIZE : NULL;
    const uint8_t *zh = bl < bs ? s->zh_tail : s->zh_full;
    int z = r->zero || bs_is_zero (r->buf + i * bs, bl);
    const uint8_t *h = NULL;

    if (want_hash) {
      if (z)
        h = zh;
      else {
        if (bs_hash (&w->hasher, r->buf + i * bs, bl, tmp) == -1)
          return -1;
        h = tmp;
      }
    }
    if (s->cfg.compare && h && memcmp (h, cur, BS_HASH_SIZE) == 0) {
      r->cls[i] = CLS_SKIP;
      skipped += bl;
    }
    else {
      r->cls[i] = z ? CLS_ZERO : CLS_DATA;
      if (z)
        zeros += bl;
      else if (r->rec)
        r->rec->written += bl;
      r->to_write += bl;
    }
    if (hout && h)
      memcpy (hout + i * BS_HASH_SIZE, h, BS_HASH_SIZE);
  }
  if (skipped)
    atomic_fetch_add (&s->bytes_skipped, skipped);
  if (!s->cfg.dst_uri && zeros)
    atomic_fetch_add (&s->bytes_zero, zeros);
  return 0;
}

static int
issue_write (struct worker *w, struct req *r, int cls, uint64_t off,
             uint64_t len, const char *data)
{
  bs_stream *s = w->s;
  int kind = cls == CLS_ZERO ? OP_ZERO : OP_WRITE;
  struct op *op = new_op (w, r, kind, off, len);
  int64_t c;

  if (op == NULL) {
    set_error (s, BS_EP_DESTINATION, 1, off, len, ENOMEM, "out of memory",
               op_name (kind));
    return -1;
  }
  nbd_completion_callback cb = { .callback = write_cb, .user_data = op,
                                 .free = free };
  if (kind == OP_ZERO)
    c = nbd_aio_zero (w->dst, len, off, cb,
                      s->cfg.allow_trim ? 0 : LIBNBD_CMD_FLAG_NO_HOLE);
  else
    c = nbd_aio_pwrite (w->dst, data, len, off, cb, 0);
  if (c == -1) {
    issue_failed (w, BS_EP_DESTINATION, kind, off, len);
    return -1;
  }
  r->pending++;
  if (w->dst_cmds++ == 0)
    w->dst_last = now_s ();
  return 0;
}

static void
issue_writes (struct worker *w, struct req *r)
{
  bs_stream *s = w->s;
  uint64_t bs = s->cfg.block_size;
  uint64_t nb = (r->len + bs - 1) / bs, i = 0;

  r->pending = 1;               /* guard */
  while (i < nb && !r->failed) {
    int c = r->cls[i];
    uint64_t j = i + 1;
    while (j < nb && r->cls[j] == c)
      j++;
    uint64_t start = i * bs;
    uint64_t end = j * bs < r->len ? j * bs : r->len;
    if (c != CLS_SKIP) {
      int as_data = c == CLS_DATA || !w->dst_can_zero;
      uint64_t step = as_data ? w->max_io : end - start;
      uint64_t o;
      for (o = start; o < end; o += step) {
        uint64_t n = end - o < step ? end - o : step;
        const char *src = c == CLS_DATA ? r->buf + o : s->zerobuf;
        if (issue_write (w, r, as_data ? CLS_DATA : CLS_ZERO,
                         r->off + o, n, src) == -1) {
          r->failed = 1;
          break;
        }
      }
    }
    i = j;
  }
  if (--r->pending == 0)
    write_finished (w, r);
}

/* Returns how many requests it took off the ready list. */
static int
process_ready (struct worker *w)
{
  bs_stream *s = w->s;
  struct req *r;
  int n = 0;

  while ((r = w->ready_head) != NULL) {
    n++;
    w->ready_head = r->link;
    if (w->ready_head == NULL)
      w->ready_tail = NULL;
    if (r->failed || atomic_load (&s->stop) != STOP_NONE) {
      abandon (w, r);
      continue;
    }
    if (classify (w, r) == -1) {
      set_error (s, BS_EP_SOURCE, 1, r->off, r->len, ENOMEM,
                 "hashing failed (out of memory or libcrypto error)",
                 "hash");
      abandon (w, r);
      continue;
    }
    if (!s->cfg.dst_uri)
      complete_request (w, r);
    else
      issue_writes (w, r);
  }
  return n;
}

/* ---------------------------------------------------------------- */
/* Worker. */

/* give_up callback of bs_connect_timed: the primary pair gives up on a
 * stop; extra pairs also when the copy is already finished. */
static int
connect_give_up (void *arg)
{
  struct worker *w = arg;
  bs_stream *s = w->s;
  return atomic_load (&s->stop) != STOP_NONE ||
         (w->idx > 0 && atomic_load (&s->finished));
}

/* Opens one handle.  The primary pair (worker 0) must connect: a failure
 * is the stream's error.  An extra pair that fails or does not complete
 * its handshake in time is only dropped (*why says why). */
static struct nbd_handle *
open_handle (struct worker *w, const char *uri, int endpoint, char *why,
             size_t whylen)
{
  bs_stream *s = w->s;
  struct nbd_handle *h = nbd_create ();
  char name[32], peer[300], msg[512];
  int fatal = w->idx == 0;

  if (h == NULL) {
    set_error (s, endpoint, 0, 0, 0, nbd_get_errno (), nbd_get_error (),
               "connect");
    return NULL;
  }
  snprintf (name, sizeof name, "bs-%s-%d",
            endpoint == BS_EP_SOURCE ? "src" : "dst", w->idx);
  nbd_set_handle_name (h, name);
  nbd_set_pread_initialize (h, false);        /* we never read a failed buf */
  bs_uri_peer (uri, peer, sizeof peer);
  int rc = bs_connect_timed (h, uri, s->cfg.connect_timeout, w->efd,
                             connect_give_up, w);
  if (rc != 0) {
    int en = rc == -3 ? ETIMEDOUT : rc == -2 ? ECANCELED : nbd_get_errno ();
    if (rc == -3)
      snprintf (msg, sizeof msg,
                "%s did not complete the NBD handshake within %g s (a server "
                "that serves one client at a time, e.g. qemu-nbd without "
                "--shared, busy with another client, or a stalled server)",
                peer, s->cfg.connect_timeout);
    else if (rc == -2)
      snprintf (msg, sizeof msg, "%s: connecting abandoned (stopped)", peer);
    else
      /* "nbd_connect:" as libnbd's synchronous connect says it: callers tell a
       * refused TLS session (fails at connect) from a link cut mid-copy by it */
      snprintf (msg, sizeof msg, "%s: nbd_connect: %s", peer,
                nbd_get_error () ? nbd_get_error () : "connect failed");
    if (fatal && rc != -2)
      set_error (s, endpoint, 0, 0, 0, en ? en : EPROTO, msg, "connect");
    snprintf (why, whylen, "%s", msg);
    nbd_close (h);
    return NULL;
  }
  int64_t size = nbd_get_size (h);
  if (size < 0 || (uint64_t) size < s->cfg.disk_size) {
    snprintf (msg, sizeof msg,
              "%s: export size %" PRId64 " is smaller than disk_size %" PRIu64,
              peer, size, s->cfg.disk_size);
    set_error (s, endpoint, 0, 0, 0, EINVAL, msg, "connect");
    nbd_close (h);
    return NULL;
  }
  return h;
}

static int
connect_worker (struct worker *w, char *why, size_t whylen)
{
  bs_stream *s = w->s;
  uint64_t max_io = s->cfg.max_request, min_bs = 1;
  int64_t v;

  w->src = open_handle (w, s->cfg.src_uri, BS_EP_SOURCE, why, whylen);
  if (w->src == NULL)
    return -1;
  v = nbd_get_block_size (w->src, LIBNBD_SIZE_MAXIMUM);
  max_io = v > 0 && (uint64_t) v < max_io ? (uint64_t) v : max_io;
  v = nbd_get_block_size (w->src, LIBNBD_SIZE_MINIMUM);
  if (v > 0 && (uint64_t) v > min_bs)
    min_bs = v;
  if (s->cfg.dst_uri) {
    w->dst = open_handle (w, s->cfg.dst_uri, BS_EP_DESTINATION, why, whylen);
    if (w->dst == NULL)
      return -1;
    if (nbd_is_read_only (w->dst) == 1) {
      set_error (s, BS_EP_DESTINATION, 0, 0, 0, EROFS,
                 "export is read-only", "connect");
      return -1;
    }
    w->dst_can_zero = nbd_can_zero (w->dst) == 1;
    w->dst_can_flush = nbd_can_flush (w->dst) == 1;
    v = nbd_get_block_size (w->dst, LIBNBD_SIZE_MAXIMUM);
    max_io = v > 0 && (uint64_t) v < max_io ? (uint64_t) v : max_io;
    v = nbd_get_block_size (w->dst, LIBNBD_SIZE_MINIMUM);
    if (v > 0 && (uint64_t) v > min_bs)
      min_bs = v;
  }
  if (max_io > DEFAULT_MAX_IO)
    max_io = DEFAULT_MAX_IO;
  max_io = max_io / min_bs * min_bs;
  if (max_io < min_bs)
    max_io = min_bs;
  w->max_io = max_io;
  return 0;
}

static void
check_flush (struct worker *w)
{
  bs_stream *s = w->s;
  unsigned g = atomic_load (&s->flush_gen);

  if (g == w->flush_gen)
    return;
  w->flush_gen = g;
  if (!w->dst_can_flush) {
    round_ack (s, g);
    return;
  }
  uint64_t target;
  pthread_mutex_lock (&s->mu);
  target = s->round_w;
  pthread_mutex_unlock (&s->mu);
  struct op *op = new_op (w, NULL, OP_FLUSH, target, 0);
  if (op == NULL) {
    set_error (s, BS_EP_DESTINATION, 0, 0, 0, ENOMEM, "out of memory",
               "flush");
    return;
  }
  op->gen = g;
  if (nbd_aio_flush (w->dst,
                     (nbd_completion_callback) { .callback = flush_cb,
                                                 .user_data = op,
                                                 .free = free },
                     0) == -1) {
    uint64_t d = atomic_load (&s->durable);
    issue_failed (w, BS_EP_DESTINATION, OP_FLUSH, d, target - d);
    return;
  }
  if (w->dst_cmds++ == 0)
    w->dst_last = now_s ();
}

/* After callbacks ran: turn a noted command failure into the stream error,
 * preferring libnbd's own text when the connection itself failed. */
static void
report_fail (struct worker *w)
{
  if (!w->fail.set || w->fail.reported)
    return;
  w->fail.reported = 1;
  char text[600];
  const char *se = strerror (w->fail.err);
  if (w->handle_err[0] && w->handle_err_side == w->fail.endpoint)
    snprintf (text, sizeof text, "%s (%s)", w->handle_err, se);
  else
    snprintf (text, sizeof text, "%s", se);
  set_error (w->s, w->fail.endpoint, 1, w->fail.off, w->fail.len,
             w->fail.err, text, op_name (w->fail.kind));
}

static void
notify (struct worker *w, struct nbd_handle *h, int endpoint, short rev)
{
  int rc = 0;
  if (rev & (POLLIN | POLLHUP | POLLERR))
    rc = nbd_aio_notify_read (h);
  if (rc != -1 && (rev & POLLOUT))
    rc = nbd_aio_notify_write (h);
  if (rc == -1 || nbd_aio_is_dead (h) || nbd_aio_is_closed (h)) {
    const char *e = nbd_get_error ();
    int en = nbd_get_errno ();
    if (!w->handle_err[0]) {
      snprintf (w->handle_err, sizeof w->handle_err, "%s",
                e ? e : "connection lost");
      w->handle_errno = en;
      w->handle_err_side = endpoint;
    }
    if (endpoint == BS_EP_SOURCE)
      w->src_dead = 1;
    else
      w->dst_dead = 1;
    /* libnbd completes every command of a dead connection with an error
     * (the callbacks above noted the first one, with its extent).  A
     * connection that died idle is reported by the next command issued on
     * it, which names its extent.  Should commands be left over anyway,
     * fail now with the lowest outstanding request of this worker rather
     * than wait forever. */
    int left = endpoint == BS_EP_SOURCE ? w->src_cmds : w->dst_cmds;
    if (left > 0 && !w->fail.set) {
      struct req *low = NULL;
      int i;
      for (i = 0; i < w->s->cfg.in_flight; i++) {
        struct req *r = &w->slots[i];
        if (r->busy && r->pending > 0 && (!low || r->off < low->off))
          low = r;
      }
      set_error (w->s, endpoint, low != NULL, low ? low->off : 0,
                 low ? low->len : 0, en ? en : ENOTCONN, w->handle_err,
                 "connection");
    }
  }
}

/* No reply on a connection with commands outstanding for request_timeout
 * seconds: the server (or the link) stalled.  Fail with the lowest request
 * still waiting on that connection (or the flush's range). */
static void
check_stall (struct worker *w)
{
  bs_stream *s = w->s;
  double now = now_s (), lim = s->cfg.request_timeout;
  int ep = 0;

  if (w->src && !w->src_dead && w->src_cmds > 0 && now - w->src_last > lim)
    ep = BS_EP_SOURCE;
  else if (w->dst && !w->dst_dead && w->dst_cmds > 0 &&
           now - w->dst_last > lim)
    ep = BS_EP_DESTINATION;
  if (!ep)
    return;
  struct req *low = NULL;
  int i;
  for (i = 0; i < s->cfg.in_flight; i++) {
    struct req *r = &w->slots[i];
    if (r->busy && r->pending > 0 && (!low || r->off < low->off))
      low = r;
  }
  char text[400], peer[300];
  bs_uri_peer (ep == BS_EP_SOURCE ? s->cfg.src_uri : s->cfg.dst_uri, peer,
               sizeof peer);
  snprintf (text, sizeof text, "no reply from %s for %g s (request_timeout): "
            "the server or the link stalled", peer, lim);
  if (low)
    set_error (s, ep, 1, low->off, low->len, ETIMEDOUT, text,
               ep == BS_EP_SOURCE ? "read" : "write");
  else {
    uint64_t d = atomic_load (&s->durable);
    pthread_mutex_lock (&s->mu);
    uint64_t t = s->round_w > d ? s->round_w : d;
    pthread_mutex_unlock (&s->mu);
    set_error (s, ep, 1, d, t - d, ETIMEDOUT, text, "flush");
  }
}

static int
live_cmds (struct worker *w)
{
  return (w->src_dead ? 0 : w->src_cmds) + (w->dst_dead ? 0 : w->dst_cmds);
}

static void
worker_loop (struct worker *w)
{
  bs_stream *s = w->s;
  double deadline = 0;

  for (;;) {
    int stopping = atomic_load (&s->stop) != STOP_NONE;
    int wait_ms = -1;
    int more = 0;               /* slots free and requests left, none waiting */

    if (stopping && deadline == 0)
      deadline = now_s () + DRAIN_SECONDS;
    if (!stopping && s->cfg.dst_uri)
      check_flush (w);
    if (!stopping) {
      while (w->free_list) {
        struct req *r = w->free_list;
        int rc = next_request (s, r, &wait_ms);
        if (rc == NR_DONE)
          break;
        if (rc == NR_WAIT)
          break;
        w->free_list = r->link;
        r->busy = 1;
        start_request (w, r);
        more = 1;
      }
    }
    /* Requests that need no I/O (known-zero ranges of a hash-only stream) complete
     * right here and free their slots: take the next ones at once instead of
     * sleeping in poll() for an event that will not come (a sparse terabyte was
     * 1,000 s of such sleeps). */
    if (process_ready (w) == 0 || wait_ms >= 0 || w->free_list == NULL)
      more = 0;
    report_fail (w);

    stopping = atomic_load (&s->stop) != STOP_NONE;
    int cmds = live_cmds (w);
    if (stopping) {
      if (deadline == 0)
        deadline = now_s () + DRAIN_SECONDS;
      if (cmds == 0) {
        w->clean_exit = 1;
        break;
      }
      if (now_s () > deadline)
        break;
    }
    else if (atomic_load (&s->finished) && cmds == 0) {
      /* Everything is written.  A flush round this worker has not joined
       * yet is not needed: run() flushes every connection after the
       * workers exit. */
      w->clean_exit = 1;
      break;
    }

    if (!stopping && s->cfg.request_timeout > 0)
      check_stall (w);

    /* poll */
    struct pollfd fds[3];
    int nfds = 0, isrc = -1, idst = -1;
    fds[nfds].fd = w->efd;
    fds[nfds].events = POLLIN;
    nfds++;
    if (w->src && !w->src_dead) {
      unsigned d = nbd_aio_get_direction (w->src);
      fds[nfds].fd = nbd_aio_get_fd (w->src);
      fds[nfds].events = ((d & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                         ((d & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0);
      if (fds[nfds].fd >= 0)
        isrc = nfds++;
    }
    if (w->dst && !w->dst_dead) {
      unsigned d = nbd_aio_get_direction (w->dst);
      fds[nfds].fd = nbd_aio_get_fd (w->dst);
      fds[nfds].events = ((d & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                         ((d & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0);
      if (fds[nfds].fd >= 0)
        idst = nfds++;
    }
    int timeout = more ? 0 : wait_ms >= 0 ? wait_ms : 1000;
    if (stopping) {
      double left = (deadline - now_s ()) * 1000.0;
      if (left < timeout)
        timeout = left < 1 ? 1 : (int) left;
    }
    int pr = poll (fds, nfds, timeout);
    if (pr == -1) {
      if (errno == EINTR)
        continue;
      set_error (s, BS_EP_NONE, 0, 0, 0, errno, strerror (errno), "poll");
      continue;
    }
    if (fds[0].revents & POLLIN) {
      uint64_t v;
      ssize_t r = read (w->efd, &v, sizeof v);
      (void) r;
    }
    if (isrc >= 0 && fds[isrc].revents)
      notify (w, w->src, BS_EP_SOURCE, fds[isrc].revents);
    if (idst >= 0 && fds[idst].revents)
      notify (w, w->dst, BS_EP_DESTINATION, fds[idst].revents);
    report_fail (w);
  }
}

/* Joins the copy: counted in the flush rounds from the next one on (it
 * has written nothing the current round must cover).  0, or -1 when the
 * stream is already stopping or finished. */
static int
join (struct worker *w)
{
  bs_stream *s = w->s;
  int ok;
  int mc = nbd_can_multi_conn (w->src) == 1 &&
           (!w->dst || nbd_can_multi_conn (w->dst) == 1);
  pthread_mutex_lock (&s->mu);
  ok = atomic_load (&s->stop) == STOP_NONE &&
       (w->idx == 0 || !atomic_load (&s->finished));
  s->connected++;
  if (ok) {
    s->active++;
    w->joined = 1;
    w->flush_gen = atomic_load (&s->flush_gen);
  }
  if (w->idx == 0) {
    s->multi_conn = mc;
    s->primary = ok ? 1 : -1;
    pthread_cond_broadcast (&s->cv);
  }
  pthread_mutex_unlock (&s->mu);
  return ok ? 0 : -1;
}

static void *
worker_main (void *arg)
{
  struct worker *w = arg;
  bs_stream *s = w->s;
  char why[512] = "";

  if (connect_worker (w, why, sizeof why) == 0) {
    if (join (w) == 0)
      worker_loop (w);
    else
      w->clean_exit = 1;
    return NULL;
  }
  pthread_mutex_lock (&s->mu);
  if (w->idx == 0) {
    s->primary = -1;
    pthread_cond_broadcast (&s->cv);
  }
  else if (!s->err.set) {
    /* An extra pair the server did not accept: copy without it. */
    s->dropped++;
    if (!s->drop_reason[0])
      snprintf (s->drop_reason, sizeof s->drop_reason, "%s", why);
  }
  pthread_mutex_unlock (&s->mu);
  if (!s->err.set) {
    /* nothing of this pair is left: it does not keep a cancelled
     * stream from its final flush */
    if (w->src)
      nbd_close (w->src);
    if (w->dst)
      nbd_close (w->dst);
    w->src = w->dst = NULL;
    w->clean_exit = 1;
  }
  return NULL;
}

/* ---------------------------------------------------------------- */

static void
fill_cancelled (bs_error *err)
{
  memset (err, 0, sizeof *err);
  snprintf (err->message, sizeof err->message, "copy cancelled");
  snprintf (err->nbd_error, sizeof err->nbd_error, "cancelled");
  err->err = ECANCELED;
}

static int
setup_workers (bs_stream *s)
{
  int n = s->cfg.connections, i, j;
  s->workers = calloc (n, sizeof *s->workers);
  if (!s->workers)
    return -1;
  s->nworkers = n;
  for (i = 0; i < n; i++) {
    struct worker *w = &s->workers[i];
    w->s = s;
    w->idx = i;
    w->efd = eventfd (0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->efd < 0)
      return -1;
    if (bs_hasher_init (&w->hasher, s->cfg.hash) == -1)
      return -1;
    w->slots = calloc (s->cfg.in_flight, sizeof *w->slots);
    if (!w->slots)
      return -1;
    for (j = 0; j < s->cfg.in_flight; j++) {
      struct req *r = &w->slots[j];
      r->w = w;                 /* buf and cls are allocated on first use */
      release_slot (w, r);
    }
  }
  return 0;
}

static void
teardown_workers (bs_stream *s)
{
  int i, j;
  atomic_store (&s->closing, 1);
  for (i = 0; i < s->nworkers; i++) {
    struct worker *w = &s->workers[i];
    if (w->src)
      nbd_close (w->src);
    if (w->dst)
      nbd_close (w->dst);
    w->src = w->dst = NULL;
  }
  for (i = 0; i < s->nworkers; i++) {
    struct worker *w = &s->workers[i];
    if (w->slots) {
      for (j = 0; j < s->cfg.in_flight; j++) {
        free (w->slots[j].buf);
        free (w->slots[j].cls);
        free (w->slots[j].rec);
      }
      free (w->slots);
    }
    bs_hasher_free (&w->hasher);
    if (w->efd >= 0)
      close (w->efd);
  }
  free (s->workers);
  s->workers = NULL;
  s->nworkers = 0;
  while (s->recs) {
    struct done_rec *r = s->recs;
    s->recs = r->next;
    free (r);
  }
  free (s->zerobuf);
  s->zerobuf = NULL;
}

/* Flush every destination connection at once and wait for all replies,
 * at most request_timeout seconds without any reply.  -1 with s->err set. */
static int
flush_all (bs_stream *s, uint64_t w)
{
  int i, n = s->nworkers, left = 0;
  int64_t *cookie = calloc (n ? n : 1, sizeof *cookie);
  struct pollfd *fds = calloc (n ? n : 1, sizeof *fds);
  double lim = s->cfg.request_timeout, last = now_s ();
  uint64_t d = atomic_load (&s->durable);
  int ret = 0;

  if (!cookie || !fds) {
    set_error (s, BS_EP_DESTINATION, 1, d, w - d, ENOMEM, "out of memory",
               "flush");
    ret = -1;
    goto out;
  }
  for (i = 0; i < n; i++) {
    struct worker *wk = &s->workers[i];
    if (!wk->dst || !wk->dst_can_flush)
      continue;
    cookie[i] = nbd_aio_flush (wk->dst, NBD_NULL_COMPLETION, 0);
    if (cookie[i] == -1) {
      set_error (s, BS_EP_DESTINATION, 1, d, w - d, nbd_get_errno (),
                 nbd_get_error (), "flush");
      ret = -1;
      goto out;
    }
    left++;
  }
  while (left > 0) {
    int nf = 0, map[64];
    for (i = 0; i < n; i++) {
      struct worker *wk = &s->workers[i];
      if (cookie[i] <= 0)
        continue;
      int r = nbd_aio_command_completed (wk->dst, cookie[i]);
      if (r == -1) {
        set_error (s, BS_EP_DESTINATION, 1, d, w - d, nbd_get_errno (),
                   nbd_get_error (), "flush");
        ret = -1;
        goto out;
      }
      if (r == 1) {
        cookie[i] = 0;
        left--;
        last = now_s ();
        continue;
      }
      unsigned dir = nbd_aio_get_direction (wk->dst);
      fds[nf].fd = nbd_aio_get_fd (wk->dst);
      fds[nf].events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                       ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0);
      fds[nf].revents = 0;
      map[nf++] = i;
    }
    if (left == 0)
      break;
    if (lim > 0 && now_s () - last > lim) {
      char text[400], peer[300];
      bs_uri_peer (s->cfg.dst_uri, peer, sizeof peer);
      snprintf (text, sizeof text, "no reply from %s for %g s "
                "(request_timeout): the server or the link stalled",
                peer, lim);
      set_error (s, BS_EP_DESTINATION, 1, d, w - d, ETIMEDOUT, text,
                 "flush");
      ret = -1;
      goto out;
    }
    int pr = poll (fds, nf, 200);
    if (pr == -1 && errno != EINTR) {
      set_error (s, BS_EP_NONE, 0, 0, 0, errno, strerror (errno), "poll");
      ret = -1;
      goto out;
    }
    for (i = 0; pr > 0 && i < nf; i++) {
      struct nbd_handle *h = s->workers[map[i]].dst;
      short rev = fds[i].revents;
      if (rev & (POLLIN | POLLHUP | POLLERR))
        nbd_aio_notify_read (h);
      if (rev & POLLOUT)
        nbd_aio_notify_write (h);
      if (nbd_aio_is_dead (h) || nbd_aio_is_closed (h)) {
        set_error (s, BS_EP_DESTINATION, 1, d, w - d, ENOTCONN,
                   nbd_get_error () ? nbd_get_error () : "connection lost",
                   "flush");
        ret = -1;
        goto out;
      }
    }
  }
 out:
  free (cookie);
  free (fds);
  return ret;
}

/* Disconnect every handle politely, but never wait more than a moment for
 * a server that does not answer (nbd_shutdown would wait for it). */
static void
disconnect_all (bs_stream *s)
{
  int i;
  double until = now_s () + 2.0;
  for (i = 0; i < s->nworkers; i++) {
    struct worker *wk = &s->workers[i];
    struct nbd_handle *hs[2] = { wk->src, wk->dst };
    int k;
    for (k = 0; k < 2; k++) {
      struct nbd_handle *h = hs[k];
      if (!h || nbd_aio_disconnect (h, 0) == -1)
        continue;
      while (!nbd_aio_is_closed (h) && !nbd_aio_is_dead (h) &&
             now_s () < until) {
        unsigned dir = nbd_aio_get_direction (h);
        struct pollfd pf = { .fd = nbd_aio_get_fd (h), .events =
          ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
          ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0) };
        if (pf.fd < 0 || poll (&pf, 1, 100) == -1)
          break;
        if (pf.revents & (POLLIN | POLLHUP | POLLERR))
          nbd_aio_notify_read (h);
        if (pf.revents & POLLOUT)
          nbd_aio_notify_write (h);
      }
    }
  }
}

/* Flush every destination connection, then publish. */
static int
final_flush (bs_stream *s, bs_error *err)
{
  uint64_t w;

  pthread_mutex_lock (&s->mu);
  w = watermark_locked (s);
  pthread_mutex_unlock (&s->mu);
  if (s->cfg.dst_uri && flush_all (s, w) == -1) {
    *err = s->err;
    return -1;
  }
  pthread_mutex_lock (&s->mu);
  publish_durable_locked (s, w);
  pthread_mutex_unlock (&s->mu);
  return 0;
}

int
bs_stream_run (bs_stream *s, uint8_t *manifest, size_t manifest_len,
               bs_error *err)
{
  int i, ret;
  uint64_t need;

  memset (err, 0, sizeof *err);
  pthread_mutex_lock (&s->mu);
  if (s->ran) {
    pthread_mutex_unlock (&s->mu);
    snprintf (err->message, sizeof err->message,
              "a Stream can only run once");
    err->set = 1;
    err->err = EINVAL;
    return BS_FAILED;
  }
  s->ran = 1;
  pthread_mutex_unlock (&s->mu);

  need = (s->cfg.disk_size + s->cfg.block_size - 1) / s->cfg.block_size
         * BS_HASH_SIZE;
  if (manifest && manifest_len != need) {
    err->set = 1;
    err->err = EINVAL;
    snprintf (err->message, sizeof err->message,
              "manifest has %zu bytes, expected %" PRIu64, manifest_len, need);
    return BS_FAILED;
  }
  s->manifest = manifest;

  if (atomic_load (&s->cancel_requested)) {
    fill_cancelled (err);
    return BS_CANCELLED;
  }

  if (bs_zero_hash (s->cfg.hash, s->cfg.block_size, s->zh_full) == -1 ||
      (s->tail_len &&
       bs_zero_hash (s->cfg.hash, s->tail_len, s->zh_tail) == -1)) {
    err->set = 1;
    err->err = ENOMEM;
    snprintf (err->message, sizeof err->message, "hash setup failed");
    return BS_FAILED;
  }

  pthread_mutex_lock (&s->mu);
  int ok = setup_workers (s) == 0;
  if (ok && s->cfg.dst_uri) {
    s->zerobuf = calloc (1, DEFAULT_MAX_IO < s->req_bytes ? s->req_bytes :
                         DEFAULT_MAX_IO);
    ok = s->zerobuf != NULL;
  }
  if (!ok) {
    pthread_mutex_unlock (&s->mu);
    teardown_workers (s);
    err->set = 1;
    err->err = ENOMEM;
    snprintf (err->message, sizeof err->message,
              "cannot allocate the worker state");
    return BS_FAILED;
  }
  s->running = 1;
  s->tokens = 0;
  s->tokens_t = now_s ();
  s->round_t = s->tokens_t;
  ring_sample_locked (s, now_s ());
  if (s->nseg == 0)
    atomic_store (&s->finished, 1);
  pthread_mutex_unlock (&s->mu);

  /* The first pair connects alone; the others only once it is copying
   * (so a server that serves one client gives it to the first pair), in
   * parallel with the copy: a pair the server refuses, or that does not
   * complete its handshake within connect_timeout, is dropped. */
  for (i = 0; i < s->nworkers; i++) {
    int rc = pthread_create (&s->workers[i].tid, NULL, worker_main,
                             &s->workers[i]);
    if (rc != 0) {
      set_error (s, BS_EP_NONE, 0, 0, 0, rc, "pthread_create failed",
                 "start");
      break;
    }
    s->workers[i].started = 1;
    if (i == 0) {
      pthread_mutex_lock (&s->mu);
      while (s->primary == 0)
        pthread_cond_wait (&s->cv, &s->mu);
      int up = s->primary == 1;
      pthread_mutex_unlock (&s->mu);
      if (!up)
        break;
    }
  }
  for (i = 0; i < s->nworkers; i++)
    if (s->workers[i].started)
      pthread_join (s->workers[i].tid, NULL);

  int stop = atomic_load (&s->stop);
  int all_clean = 1;
  for (i = 0; i < s->nworkers; i++)
    if (!s->workers[i].clean_exit || s->workers[i].dst_dead ||
        s->workers[i].src_dead)
      all_clean = 0;

  if (stop == STOP_CANCEL) {
    /* Best effort: make what was written durable so a resume skips it. */
    bs_error ferr;
    if (all_clean)
      final_flush (s, &ferr);
    fill_cancelled (err);
    ret = BS_CANCELLED;
  }
  else if (stop == STOP_ERROR || s->err.set) {
    pthread_mutex_lock (&s->mu);
    *err = s->err;
    pthread_mutex_unlock (&s->mu);
    ret = BS_FAILED;
  }
  else if (final_flush (s, err) == -1)
    ret = BS_FAILED;
  else {
    atomic_store (&s->extents_done, s->nseg);
    atomic_store (&s->done, 1);
    ret = BS_OK;
  }

  if (ret != BS_FAILED && all_clean)
    disconnect_all (s);

  pthread_mutex_lock (&s->mu);
  s->running = 0;
  s->t_end = now_s ();
  pthread_mutex_unlock (&s->mu);
  teardown_workers (s);
  s->manifest = NULL;
  return ret;
}
