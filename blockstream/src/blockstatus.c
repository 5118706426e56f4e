/* NBD block status (base:allocation, qemu:dirty-bitmap:NAME, ...) through
 * libnbd's synchronous API. */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libnbd.h>

#include "bs.h"

#define CONNECT_TIMEOUT 30       /* seconds for connect + handshake */

#define BS_CHUNK (1ULL << 30)   /* ask for at most 1 GiB per command */

struct collect {
  const char *context;
  uint64_t limit;
  bs_bsentry *v;
  size_t n, cap;
  uint64_t next;                /* end of what we have so far */
  int oom;
};

static int
push (struct collect *c, uint64_t off, uint64_t len, uint32_t flags)
{
  if (off >= c->limit || len == 0)
    return 0;
  if (len > c->limit - off)
    len = c->limit - off;
  if (c->n > 0 && c->v[c->n - 1].flags == flags &&
      c->v[c->n - 1].off + c->v[c->n - 1].len == off) {
    c->v[c->n - 1].len += len;
    return 0;
  }
  if (c->n == c->cap) {
    size_t nc = c->cap ? c->cap * 2 : 64;
    bs_bsentry *nv = realloc (c->v, nc * sizeof *nv);
    if (!nv)
      return -1;
    c->v = nv;
    c->cap = nc;
  }
  c->v[c->n].off = off;
  c->v[c->n].len = len;
  c->v[c->n].flags = flags;
  c->n++;
  return 0;
}

static int
extent_cb (void *ud, const char *metacontext, uint64_t offset,
           uint32_t *entries, size_t nr, int *error)
{
  struct collect *c = ud;
  size_t i;
  uint64_t off = offset;
  (void) error;

  if (strcmp (metacontext, c->context) != 0)
    return 0;
  /* Only accept what continues where we are (a server may repeat). */
  for (i = 0; i + 1 < nr; i += 2) {
    uint64_t len = entries[i];
    if (off + len > c->next && off <= c->next) {
      uint64_t skip = c->next - off;
      if (push (c, c->next, len - skip, entries[i + 1]) == -1) {
        c->oom = 1;
        return 0;
      }
      c->next = off + len;
    }
    off += len;
  }
  return 0;
}

static void
fill (bs_error *err, int has_extent, uint64_t off, uint64_t len,
      int errnum, const char *text, const char *what)
{
  memset (err, 0, sizeof *err);
  err->set = 1;
  err->endpoint = BS_EP_SOURCE;
  err->has_extent = has_extent;
  err->off = off;
  err->len = len;
  err->err = errnum;
  snprintf (err->nbd_error, sizeof err->nbd_error, "%s",
            text && *text ? text : strerror (errnum));
  if (has_extent)
    snprintf (err->message, sizeof err->message,
              "block status %s failed for extent offset=%" PRIu64
              " length=%" PRIu64 ": %s", what, off, len, err->nbd_error);
  else
    snprintf (err->message, sizeof err->message, "block status %s: %s",
              what, err->nbd_error);
}

int
bs_block_status (const char *uri, const char *context, uint64_t limit,
                 bs_bsentry **out, size_t *nout, uint64_t *export_size,
                 bs_error *err, int *missing_context)
{
  struct nbd_handle *h = nbd_create ();
  struct collect c = { .context = context };
  int64_t size;

  *out = NULL;
  *nout = 0;
  *missing_context = 0;
  if (h == NULL) {
    fill (err, 0, 0, 0, nbd_get_errno (), nbd_get_error (), "connect");
    return -1;
  }
  int rc = nbd_add_meta_context (h, context) == -1 ? -1 :
           bs_connect_timed (h, uri, CONNECT_TIMEOUT, -1, NULL, NULL);
  if (rc == -3) {
    char msg[600], peer[300];
    bs_uri_peer (uri, peer, sizeof peer);
    snprintf (msg, sizeof msg, "%s did not complete the NBD handshake "
              "within %d s (a server that serves one client at a time, "
              "busy with another client, or a stalled server)", peer,
              CONNECT_TIMEOUT);
    fill (err, 0, 0, 0, ETIMEDOUT, msg, "connect");
    goto fail;
  }
  if (rc != 0) {
    int en = nbd_get_errno ();
    fill (err, 0, 0, 0, en ? en : EPROTO, nbd_get_error (), "connect");
    goto fail;
  }
  if (nbd_can_meta_context (h, context) != 1) {
    char msg[512];
    snprintf (msg, sizeof msg,
              "the server does not provide meta context '%s'", context);
    fill (err, 0, 0, 0, ENOTSUP, msg, "context");
    *missing_context = 1;
    goto fail;
  }
  size = nbd_get_size (h);
  if (size < 0) {
    fill (err, 0, 0, 0, nbd_get_errno (), nbd_get_error (), "size");
    goto fail;
  }
  *export_size = size;
  c.limit = limit == 0 || limit > (uint64_t) size ? (uint64_t) size : limit;
  c.next = 0;
  while (c.next < c.limit) {
    uint64_t before = c.next;
    uint64_t count = c.limit - c.next;
    if (count > BS_CHUNK)
      count = BS_CHUNK;
    if (nbd_block_status (h, count, c.next,
                          (nbd_extent_callback) { .callback = extent_cb,
                                                  .user_data = &c },
                          0) == -1) {
      fill (err, 1, c.next, count, nbd_get_errno (), nbd_get_error (),
            "read");
      goto fail;
    }
    if (c.oom) {
      fill (err, 0, 0, 0, ENOMEM, "out of memory", "read");
      goto fail;
    }
    if (c.next <= before) {
      fill (err, 1, before, count, EPROTO,
            "the server returned no extent for this range", "read");
      goto fail;
    }
  }
  nbd_shutdown (h, 0);
  nbd_close (h);
  *out = c.v;
  *nout = c.n;
  return 0;

 fail:
  nbd_close (h);
  free (c.v);
  return -1;
}
