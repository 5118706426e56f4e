/* Connecting a libnbd handle to a URI, with the few extras the project's
 * URIs use on top of what libnbd 1.14's nbd_connect_uri understands. */
#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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

static int
prepare (struct nbd_handle *h, const char *uri)
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
  return 0;
}

int
bs_connect (struct nbd_handle *h, const char *uri)
{
  if (prepare (h, uri) == -1)
    return -1;
  return nbd_connect_uri (h, uri);
}

static double
mono (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

void
bs_uri_peer (const char *uri, char *out, size_t n)
{
  /* the URI up to its query, plus the socket= of a unix URI: enough to
   * name the server without printing credentials' file names */
  size_t q = strcspn (uri, "?#");
  char *sock = query_param (uri, "socket");
  if (sock)
    snprintf (out, n, "%.*s (socket %s)", (int) q, uri, sock);
  else
    snprintf (out, n, "%.*s", (int) q, uri);
  free (sock);
}

int
bs_connect_timed (struct nbd_handle *h, const char *uri, double timeout,
                  int wake_fd, int (*give_up) (void *), void *arg)
{
  double deadline = mono () + timeout;

  if (prepare (h, uri) == -1 || nbd_aio_connect_uri (h, uri) == -1)
    return -1;
  for (;;) {
    if (nbd_aio_is_ready (h))
      return 0;
    if (nbd_aio_is_dead (h) || nbd_aio_is_closed (h))
      return -1;
    if (give_up && give_up (arg))
      return -2;
    double left = timeout > 0 ? deadline - mono () : 1.0;
    if (left <= 0)
      return -3;
    unsigned dir = nbd_aio_get_direction (h);
    struct pollfd fds[2] = {
      { .fd = nbd_aio_get_fd (h), .events =
        ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
        ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0) },
      { .fd = wake_fd, .events = POLLIN },
    };
    int ms = left > 1.0 ? 1000 : (int) (left * 1000) + 1;
    if (fds[0].fd < 0)
      return -1;
    int r = poll (fds, wake_fd >= 0 ? 2 : 1, ms);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    if (wake_fd >= 0 && (fds[1].revents & POLLIN)) {
      uint64_t v;
      ssize_t rr = read (wake_fd, &v, sizeof v);
      (void) rr;
    }
    if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      if (nbd_aio_notify_read (h) == -1)
        return -1;
    }
    if (fds[0].revents & POLLOUT) {
      if (nbd_aio_notify_write (h) == -1)
        return -1;
    }
  }
}
