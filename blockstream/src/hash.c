/* Block hashing (xxh128 via libxxhash, BLAKE2b via libcrypto) and zero
 * detection. */
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <xxhash.h>

#include "bs.h"

int
bs_hasher_init (bs_hasher *h, int alg)
{
  memset (h, 0, sizeof *h);
  h->alg = alg;
  if (alg == BS_HASH_BLAKE2B) {
    h->md = EVP_MD_fetch (NULL, "BLAKE2B-512", NULL);
    if (h->md == NULL)
      return -1;
    h->ctx = EVP_MD_CTX_new ();
    if (h->ctx == NULL) {
      EVP_MD_free (h->md);
      h->md = NULL;
      return -1;
    }
  }
  return 0;
}

void
bs_hasher_free (bs_hasher *h)
{
  if (h->ctx)
    EVP_MD_CTX_free (h->ctx);
  if (h->md)
    EVP_MD_free (h->md);
  h->ctx = NULL;
  h->md = NULL;
}

int
bs_hash (bs_hasher *h, const void *p, size_t n, uint8_t out[BS_HASH_SIZE])
{
  switch (h->alg) {
  case BS_HASH_XXH128: {
    XXH128_hash_t v = XXH3_128bits (p, n);
    XXH128_canonical_t c;
    XXH128_canonicalFromHash (&c, v);     /* big endian, portable */
    memcpy (out, c.digest, BS_HASH_SIZE);
    return 0;
  }
  case BS_HASH_BLAKE2B: {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (EVP_DigestInit_ex2 (h->ctx, h->md, NULL) != 1 ||
        EVP_DigestUpdate (h->ctx, p, n) != 1 ||
        EVP_DigestFinal_ex (h->ctx, md, &mdlen) != 1 ||
        mdlen < BS_HASH_SIZE)
      return -1;
    memcpy (out, md, BS_HASH_SIZE);       /* BLAKE2b-512 truncated */
    return 0;
  }
  default:
    memset (out, 0, BS_HASH_SIZE);
    return 0;
  }
}

/* True if the n bytes at p are all zero.  Checks a short prefix by hand
 * (random data exits here), then compares the buffer with itself shifted
 * by 16 bytes, which libc does with vector instructions. */
int
bs_is_zero (const void *p, size_t n)
{
  const unsigned char *b = p;
  size_t i, pre = n < 16 ? n : 16;

  for (i = 0; i < pre; i++)
    if (b[i])
      return 0;
  if (n <= 16)
    return 1;
  return memcmp (b, b + 16, n - 16) == 0;
}

int
bs_zero_hash (int alg, size_t n, uint8_t out[BS_HASH_SIZE])
{
  bs_hasher h;
  void *z;
  int r;

  if (alg == BS_HASH_NONE) {
    memset (out, 0, BS_HASH_SIZE);
    return 0;
  }
  z = calloc (1, n ? n : 1);
  if (z == NULL)
    return -1;
  if (bs_hasher_init (&h, alg) == -1) {
    free (z);
    return -1;
  }
  r = bs_hash (&h, z, n, out);
  bs_hasher_free (&h);
  free (z);
  return r;
}

uint64_t
bs_xxh64 (const void *p, size_t n, uint64_t seed)
{
  return XXH64 (p, n, seed);
}
