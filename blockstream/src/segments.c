/* Extent list normalisation: the copy only ever handles whole blocks.
 *
 * Rules (see docs/blockstream.md):
 *  - extents of the same kind that overlap or touch are merged;
 *  - data extents are widened to block boundaries (clamped to disk_size);
 *  - a block is a zero block only when every byte of it (up to disk_size)
 *    is covered by zero extents and no data extent touches it; the partial
 *    blocks at the edges of a zero extent are read like data;
 *  - everything below start_offset is dropped.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "bs.h"

typedef struct {
  uint64_t s, e;
} ival;

typedef struct {
  ival *v;
  size_t n, cap;
} ivec;

static int
ivec_push (ivec *a, uint64_t s, uint64_t e)
{
  if (s >= e)
    return 0;
  /* merge with the previous interval when touching/overlapping */
  if (a->n > 0 && s <= a->v[a->n - 1].e) {
    if (e > a->v[a->n - 1].e)
      a->v[a->n - 1].e = e;
    return 0;
  }
  if (a->n == a->cap) {
    size_t nc = a->cap ? a->cap * 2 : 16;
    ival *nv = realloc (a->v, nc * sizeof *nv);
    if (nv == NULL)
      return -1;
    a->v = nv;
    a->cap = nc;
  }
  a->v[a->n].s = s;
  a->v[a->n].e = e;
  a->n++;
  return 0;
}

static int
cmp_ival (const void *a, const void *b)
{
  const ival *x = a, *y = b;
  if (x->s != y->s)
    return x->s < y->s ? -1 : 1;
  if (x->e != y->e)
    return x->e < y->e ? -1 : 1;
  return 0;
}

/* Sorts raw and pushes it merged into out. */
static int
sort_merge (ival *raw, size_t n, ivec *out)
{
  size_t i;
  qsort (raw, n, sizeof *raw, cmp_ival);
  for (i = 0; i < n; i++)
    if (ivec_push (out, raw[i].s, raw[i].e) == -1)
      return -1;
  return 0;
}

/* Merges two sorted, internally merged lists. */
static int
union2 (const ivec *a, const ivec *b, ivec *out)
{
  size_t i = 0, j = 0;
  while (i < a->n || j < b->n) {
    const ival *x;
    if (j >= b->n || (i < a->n && a->v[i].s <= b->v[j].s))
      x = &a->v[i++];
    else
      x = &b->v[j++];
    if (ivec_push (out, x->s, x->e) == -1)
      return -1;
  }
  return 0;
}

/* out = a minus b (both sorted and merged). */
static int
subtract (const ivec *a, const ivec *b, ivec *out)
{
  size_t j = 0, i;
  for (i = 0; i < a->n; i++) {
    uint64_t s = a->v[i].s, e = a->v[i].e;
    while (j < b->n && b->v[j].e <= s)
      j++;
    size_t k = j;
    while (s < e) {
      if (k >= b->n || b->v[k].s >= e) {
        if (ivec_push (out, s, e) == -1)
          return -1;
        break;
      }
      if (b->v[k].s > s && ivec_push (out, s, b->v[k].s) == -1)
        return -1;
      if (b->v[k].e > s)
        s = b->v[k].e;
      k++;
    }
  }
  return 0;
}

int
bs_normalize (const bs_extent *in, size_t n, uint64_t disk_size,
              uint64_t block_size, uint64_t start_offset,
              bs_segment **out, size_t *nout)
{
  ival *rawd = NULL, *rawz = NULL;
  size_t nd = 0, nz = 0, i;
  ivec d = { 0 }, z = { 0 }, dw = { 0 }, edges = { 0 }, inner = { 0 };
  ivec data = { 0 }, zeros = { 0 };
  bs_segment *seg = NULL;
  size_t nseg = 0, cap;
  int ret = -1;
  uint64_t mask = block_size - 1;

  *out = NULL;
  *nout = 0;
  if (block_size == 0 || (block_size & mask) != 0 ||
      start_offset > disk_size) {
    errno = EINVAL;
    return -1;
  }
  for (i = 0; i < n; i++)
    if (in[i].off > disk_size || in[i].len > disk_size - in[i].off) {
      errno = EINVAL;
      return -1;
    }

  rawd = malloc ((n ? n : 1) * sizeof *rawd);
  rawz = malloc ((n ? n : 1) * sizeof *rawz);
  if (!rawd || !rawz)
    goto nomem;
  for (i = 0; i < n; i++) {
    if (in[i].len == 0)
      continue;
    if (in[i].zero) {
      rawz[nz].s = in[i].off;
      rawz[nz++].e = in[i].off + in[i].len;
    }
    else {
      rawd[nd].s = in[i].off;
      rawd[nd++].e = in[i].off + in[i].len;
    }
  }
  if (sort_merge (rawd, nd, &d) == -1 || sort_merge (rawz, nz, &z) == -1)
    goto nomem;

  /* Data widened to whole blocks. */
  for (i = 0; i < d.n; i++) {
    uint64_t s = d.v[i].s & ~mask;
    uint64_t e = (d.v[i].e + mask) & ~mask;
    if (e > disk_size || e < d.v[i].e)
      e = disk_size;
    if (ivec_push (&dw, s, e) == -1)
      goto nomem;
  }
  /* Zero extents: fully covered blocks are zero, partial edge blocks are
   * data. */
  for (i = 0; i < z.n; i++) {
    uint64_t s = z.v[i].s, e = z.v[i].e;
    uint64_t is = (s + mask) & ~mask;                   /* ceil */
    uint64_t ie = e == disk_size ? disk_size : (e & ~mask);
    if (is < s)
      is = disk_size;           /* overflow: cannot happen with sane sizes */
    if (is > disk_size)
      is = disk_size;
    if (is < ie) {
      if (ivec_push (&inner, is, ie) == -1)
        goto nomem;
      if (s < is && ivec_push (&edges, s & ~mask, is) == -1)
        goto nomem;
      if (ie < e) {
        uint64_t ee = (e + mask) & ~mask;
        if (ee > disk_size || ee < e)
          ee = disk_size;
        if (ivec_push (&edges, ie, ee) == -1)
          goto nomem;
      }
    }
    else {
      uint64_t ee = (e + mask) & ~mask;
      if (ee > disk_size || ee < e)
        ee = disk_size;
      if (ivec_push (&edges, s & ~mask, ee) == -1)
        goto nomem;
    }
  }
  if (union2 (&dw, &edges, &data) == -1)
    goto nomem;
  if (subtract (&inner, &data, &zeros) == -1)
    goto nomem;

  cap = data.n + zeros.n;
  seg = malloc ((cap ? cap : 1) * sizeof *seg);
  if (seg == NULL)
    goto nomem;
  {
    size_t a = 0, b = 0;
    while (a < data.n || b < zeros.n) {
      uint64_t s, e;
      int zk;
      if (b >= zeros.n || (a < data.n && data.v[a].s < zeros.v[b].s)) {
        s = data.v[a].s; e = data.v[a].e; zk = 0; a++;
      }
      else {
        s = zeros.v[b].s; e = zeros.v[b].e; zk = 1; b++;
      }
      if (e <= start_offset)
        continue;
      if (s < start_offset)
        s = start_offset;
      if (nseg > 0 && seg[nseg - 1].zero == zk && seg[nseg - 1].end == s) {
        seg[nseg - 1].end = e;
        continue;
      }
      seg[nseg].start = s;
      seg[nseg].end = e;
      seg[nseg].zero = zk;
      nseg++;
    }
  }
  *out = seg;
  *nout = nseg;
  seg = NULL;
  ret = 0;
  goto done;

 nomem:
  errno = ENOMEM;
 done:
  free (seg);
  free (rawd);
  free (rawz);
  free (d.v);
  free (z.v);
  free (dw.v);
  free (edges.v);
  free (inner.v);
  free (data.v);
  free (zeros.v);
  return ret;
}
