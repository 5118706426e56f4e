/* blockstream: the C core (no Python in here except in module.c).
 *
 * bs_*  : pure C, GIL-free engine used by module.c.
 */
#ifndef BLOCKSTREAM_BS_H
#define BLOCKSTREAM_BS_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>

#define BS_HASH_SIZE 16

enum bs_hash_alg { BS_HASH_NONE = 0, BS_HASH_XXH128 = 1, BS_HASH_BLAKE2B = 2 };

/* ---- hashing and zero detection (hash.c) ---- */

/* Per-thread hashing context (BLAKE2b needs an EVP context). */
typedef struct bs_hasher {
  int alg;
  EVP_MD *md;          /* BLAKE2b-512 (fetched once) */
  EVP_MD_CTX *ctx;
} bs_hasher;

int bs_hasher_init (bs_hasher *h, int alg);     /* 0 ok, -1 on failure */
void bs_hasher_free (bs_hasher *h);
/* 0 ok, -1 on failure (libcrypto error) */
int bs_hash (bs_hasher *h, const void *p, size_t n, uint8_t out[BS_HASH_SIZE]);
int bs_is_zero (const void *p, size_t n);
/* Hash of n zero bytes. */
int bs_zero_hash (int alg, size_t n, uint8_t out[BS_HASH_SIZE]);
uint64_t bs_xxh64 (const void *p, size_t n, uint64_t seed);

/* ---- extent normalisation (segments.c) ---- */

typedef struct bs_extent {
  uint64_t off, len;
  int zero;
} bs_extent;

typedef struct bs_segment {
  uint64_t start, end;          /* block aligned (end may be disk_size) */
  int zero;                     /* 1: whole segment known to read as zero */
} bs_segment;

/* Sort/merge/widen extents to block_size boundaries (clamped to
 * disk_size), classify blocks (zero only when every byte of the block is
 * covered by zero extents and no data extent touches it) and drop what
 * lies below start_offset.  Returns 0, or -1 with errno (ENOMEM/EINVAL).
 * The caller frees *out. */
int bs_normalize (const bs_extent *in, size_t n, uint64_t disk_size,
                  uint64_t block_size, uint64_t start_offset,
                  bs_segment **out, size_t *nout);

/* ---- the stream engine (stream.c) ---- */

typedef struct bs_config {
  const char *src_uri;
  const char *dst_uri;          /* NULL: read-and-hash only */
  uint64_t disk_size;
  uint64_t block_size;
  int hash;                     /* enum bs_hash_alg */
  int compare;
  uint64_t max_request;
  int connections;
  int in_flight;
  uint64_t rate_limit;          /* bytes/s, 0 = unlimited */
  int allow_trim;
  uint64_t start_offset;
  uint64_t flush_interval;
  double flush_seconds;         /* also flush when this long since the last round; 0 = off */
  double connect_timeout;       /* seconds for connect + handshake; 0 = no limit */
  double request_timeout;       /* seconds without any reply while commands are
                                 * outstanding on a connection; 0 = no limit */
  uint64_t max_unflushed;       /* data bytes taken beyond durable_offset; 0 = no limit */
} bs_config;

typedef struct bs_progress {
  uint64_t bytes_read, bytes_written, bytes_zero, bytes_skipped;
  uint64_t bytes_total;
  uint64_t extents_done, extents_total;
  uint64_t durable_offset;
  uint64_t read_durable, written_durable;
  double rate;
  int done;
  int connections;              /* connection pairs that completed their handshake */
  int connections_dropped;      /* extra pairs refused or not ready within connect_timeout */
  int multi_conn;               /* 1: every server advertised NBD_FLAG_CAN_MULTI_CONN */
} bs_progress;

enum bs_endpoint { BS_EP_NONE = 0, BS_EP_SOURCE = 1, BS_EP_DESTINATION = 2 };

typedef struct bs_error {
  int set;
  int endpoint;                 /* enum bs_endpoint */
  int has_extent;
  uint64_t off, len;
  int err;                      /* errno */
  char nbd_error[512];          /* libnbd's text (or strerror) */
  char message[768];            /* full human readable message */
} bs_error;

typedef struct bs_stream bs_stream;

enum bs_result { BS_OK = 0, BS_FAILED = -1, BS_CANCELLED = -2 };

/* Takes ownership of segs (malloc'd).  The config strings are copied.
 * Returns NULL with errno set on allocation failure. */
bs_stream *bs_stream_new (const bs_config *cfg, bs_segment *segs, size_t nseg);
void bs_stream_free (bs_stream *s);
/* Runs the copy in the calling thread (spawning cfg.connections workers).
 * manifest may be NULL.  Returns enum bs_result; details in *err. */
int bs_stream_run (bs_stream *s, uint8_t *manifest, size_t manifest_len,
                   bs_error *err);
void bs_stream_cancel (bs_stream *s);
void bs_stream_set_rate (bs_stream *s, uint64_t rate);
void bs_stream_progress (bs_stream *s, bs_progress *p);

/* ---- connecting (connect.c) ---- */

struct nbd_handle;
/* nbd_connect_uri plus: tls-psk-file allowed, tls-username= honoured. */
int bs_connect (struct nbd_handle *h, const char *uri);
/* The same, asynchronously, until the handshake is done: 0 ready, -1 a
 * libnbd error (nbd_get_error), -2 give_up(arg) returned true (checked
 * whenever wake_fd, an eventfd or -1, is written), -3 the handshake did not
 * complete within timeout seconds (0: no limit). */
int bs_connect_timed (struct nbd_handle *h, const char *uri, double timeout,
                      int wake_fd, int (*give_up) (void *), void *arg);
/* A printable name of the server of a URI (no query parameters). */
void bs_uri_peer (const char *uri, char *out, size_t n);

/* ---- block status (blockstatus.c) ---- */

typedef struct bs_bsentry {
  uint64_t off, len;
  uint32_t flags;
} bs_bsentry;

/* Reads the extents of `context` from offset 0 to `limit` (0: export
 * size).  Returns 0, or -1 with *err filled.  *missing_context is set to 1
 * when the server does not offer the context. */
int bs_block_status (const char *uri, const char *context, uint64_t limit,
                     bs_bsentry **out, size_t *nout, uint64_t *export_size,
                     bs_error *err, int *missing_context);

#endif
