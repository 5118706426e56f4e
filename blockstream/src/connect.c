/* Connecting a libnbd handle to a URI, with the few extras the project's
 * URIs use on top of what libnbd 1.14's nbd_connect_uri understands. */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <libnbd.h>

#include "bs.h"

static int
hexval (char c)
{
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

/* Value of query parameter `key` (percent-decoded, malloc'd) or NULL. */
static char *
query_param (const char *uri, const char *key)
{
  const char *q = strchr (uri, '?');
  size_t klen = strlen (key);

  while (q) {
    q++;
    if (strncmp (q, key, klen) == 0 && q[klen] == '=') {
      const char *v = q + klen + 1;
      size_t n = strcspn (v, "&#");
      char *out = malloc (n + 1), *o = out;
      size_t i;
      if (!out)
        return NULL;
      for (i = 0; i < n; i++) {
        if (v[i] == '%' && i + 2 < n + 1 && hexval (v[i + 1]) >= 0 &&
            hexval (v[i + 2]) >= 0) {
          *o++ = (char) (hexval (v[i + 1]) * 16 + hexval (v[i + 2]));
          i += 2;
        }
        else
          *o++ = v[i];
      }
      *o = '\0';
      return out;
    }
    q = strchr (q, '&');
  }
  return NULL;
}

int
bs_connect (struct nbd_handle *h, const char *uri)
{
  char *user;

  /* tls-psk-file= names a local file */
  if (nbd_set_uri_allow_local_file (h, true) == -1)
    return -1;
  /* libnbd 1.14 takes the TLS user name only from the authority
   * (nbds://USER@host/); also accept tls-username=USER, as newer libnbd
   * does.  A user in the authority still wins. */
  user = query_param (uri, "tls-username");
  if (user) {
    int r = nbd_set_tls_username (h, user);
    free (user);
    if (r == -1)
      return -1;
  }
  return nbd_connect_uri (h, uri);
}
