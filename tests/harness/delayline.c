/*
 * delayline: the site link of the two-site test harness as a pair of TUN
 * devices, joined in user space with a per-direction delay -- "netem delay"
 * for kernels built without sch_netem (and without the fq qdisc that would
 * allow delay by departure time).  Used by tests/harness/netns.py
 * (two_sites(link="tun")); compiled there on first use.
 *
 *   delayline NETNS_A DEV_A NETNS_B DEV_B MTU QUEUE_BYTES
 *
 * Creates the TUN device DEV_A inside the network namespace file NETNS_A
 * (e.g. /run/netns/x-a) and DEV_B inside NETNS_B, prints "ready", then moves
 * every IP packet the kernel sends out of DEV_A into DEV_B (and B into A) once
 * the direction's delay has passed since it was read.  The devices are not
 * persistent: they vanish when this process exits.  The caller configures
 * addresses, MTU, qdiscs (tbf for a rate, pfifo limit 0 for a black hole) and
 * link state with iproute2 as for any other device.
 *
 * Commands, one per line on stdin, each answered with one line on stdout:
 *   delay a|b MS   packets leaving site a (or b) from now on wait MS ms
 *                  (fractions allowed) -> "ok"
 *   stats          -> one JSON object with per-direction counters
 * EOF on stdin (the harness is gone) ends the process, as does SIGTERM.
 *
 * Packets keep their order (a FIFO per direction, like netem without
 * reordering); a direction holds at most QUEUE_BYTES of packets, more are
 * dropped and counted, as a full netem queue does.  Times are CLOCK_MONOTONIC
 * with ppoll()'s nanosecond timeout, so the added delay is accurate to the
 * scheduler's wake-up latency (tens of microseconds here).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define BURST 256          /* packets read per readable device per round */
#define MAX_PACKET 65536   /* TUN's largest packet (MTU <= 65535) */

struct slot {
    uint64_t due_ns;
    uint32_t len;
};

/* one direction: a ring of fixed-size slots */
struct queue {
    const char *name;      /* "a" = a -> b, "b" = b -> a */
    int in_fd, out_fd;
    struct slot *meta;
    unsigned char *data;
    size_t slot_size, cap, head, count;
    uint64_t delay_ns;
    uint64_t packets, bytes, dropped, write_errors;
};

static void die(const char *what, const char *arg)
{
    fprintf(stderr, "delayline: %s %s: %s\n", what, arg ? arg : "", strerror(errno));
    exit(1);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Create TUN device `name` inside the namespace at `netns_path`, then return
 * to our own namespace (the fd stays bound to the device). */
static int open_tun_in(int home_ns, const char *netns_path, const char *name)
{
    int ns = open(netns_path, O_RDONLY | O_CLOEXEC);
    if (ns < 0)
        die("cannot open network namespace", netns_path);
    if (setns(ns, CLONE_NEWNET) < 0)
        die("setns", netns_path);
    close(ns);
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        die("cannot open", "/dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    if (strlen(name) >= IFNAMSIZ) {
        errno = ENAMETOOLONG;
        die("device name", name);
    }
    strcpy(ifr.ifr_name, name);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0)
        die("TUNSETIFF", name);
    if (setns(home_ns, CLONE_NEWNET) < 0)
        die("setns back to", "the original namespace");
    return fd;
}

static void queue_init(struct queue *q, const char *name, int in_fd, int out_fd, size_t mtu,
                       size_t queue_bytes)
{
    memset(q, 0, sizeof *q);
    q->name = name;
    q->in_fd = in_fd;
    q->out_fd = out_fd;
    q->slot_size = (mtu + 63) & ~(size_t)63;
    q->cap = queue_bytes / q->slot_size;
    if (q->cap < 16)
        q->cap = 16;
    q->meta = calloc(q->cap, sizeof *q->meta);
    q->data = malloc(q->cap * q->slot_size);
    if (!q->meta || !q->data)
        die("out of memory for the queue of direction", name);
}

/* Read what the kernel sent out of the input device (up to BURST packets). */
static void queue_fill(struct queue *q, unsigned char *scratch)
{
    uint64_t now = now_ns();
    for (int i = 0; i < BURST; i++) {
        size_t tail = (q->head + q->count) % q->cap;
        int full = q->count == q->cap;
        unsigned char *buf = full ? scratch : q->data + tail * q->slot_size;
        size_t room = full ? MAX_PACKET : q->slot_size;
        ssize_t n = read(q->in_fd, buf, room);
        if (n < 0) /* EAGAIN: read all there was */
            return;
        if (full || (size_t)n >= room) { /* queue full, or a packet above the MTU */
            q->dropped++;
            continue;
        }
        q->meta[tail].due_ns = now + q->delay_ns;
        q->meta[tail].len = (uint32_t)n;
        q->count++;
    }
}

/* Deliver the packets whose time has come; returns the next due time or 0. */
static uint64_t queue_drain(struct queue *q)
{
    uint64_t now = now_ns();
    while (q->count) {
        struct slot *s = &q->meta[q->head];
        if (s->due_ns > now)
            return s->due_ns;
        /* a down device refuses (EIO): the packet is lost, as on a cut link */
        if (write(q->out_fd, q->data + q->head * q->slot_size, s->len) == (ssize_t)s->len) {
            q->packets++;
            q->bytes += s->len;
        } else {
            q->write_errors++;
        }
        q->head = (q->head + 1) % q->cap;
        q->count--;
    }
    return 0;
}

static void print_stats(struct queue *q)
{
    printf("{");
    for (int i = 0; i < 2; i++)
        printf("%s\"%s\": {\"delay_ms\": %.3f, \"packets\": %llu, \"bytes\": %llu, \"queued\": %zu, "
               "\"dropped\": %llu, \"write_errors\": %llu}",
               i ? ", " : "", q[i].name, q[i].delay_ns / 1e6, (unsigned long long)q[i].packets,
               (unsigned long long)q[i].bytes, q[i].count, (unsigned long long)q[i].dropped,
               (unsigned long long)q[i].write_errors);
    printf("}\n");
}

static void command(struct queue *q, char *line)
{
    char site[8];
    double ms;
    if (sscanf(line, "delay %7s %lf", site, &ms) == 2 && ms >= 0 && ms < 3.6e6 &&
        (!strcmp(site, "a") || !strcmp(site, "b"))) {
        q[site[0] == 'b'].delay_ns = (uint64_t)(ms * 1e6);
        printf("ok\n");
    } else if (!strncmp(line, "stats", 5)) {
        print_stats(q);
    } else {
        printf("error: unknown command (delay a|b MS, stats)\n");
    }
    fflush(stdout);
}

/* Returns 0 at EOF. */
static int read_commands(struct queue *q, char *buf, size_t *used, size_t size)
{
    ssize_t n = read(STDIN_FILENO, buf + *used, size - 1 - *used);
    if (n == 0)
        return 0;
    if (n < 0)
        return errno == EINTR || errno == EAGAIN;
    *used += (size_t)n;
    buf[*used] = 0;
    char *start = buf, *nl;
    while ((nl = strchr(start, '\n'))) {
        *nl = 0;
        command(q, start);
        start = nl + 1;
    }
    *used -= (size_t)(start - buf);
    memmove(buf, start, *used);
    if (*used == size - 1) /* a line longer than the buffer: drop it */
        *used = 0;
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: delayline NETNS_A DEV_A NETNS_B DEV_B MTU QUEUE_BYTES\n");
        return 2;
    }
    size_t mtu = strtoul(argv[5], NULL, 10), queue_bytes = strtoul(argv[6], NULL, 10);
    if (mtu < 68 || mtu >= MAX_PACKET || queue_bytes == 0) {
        fprintf(stderr, "delayline: MTU in 68..65535, QUEUE_BYTES > 0\n");
        return 2;
    }
    prctl(PR_SET_PDEATHSIG, SIGTERM); /* the harness died: the link goes with it */
    int home = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    if (home < 0)
        die("cannot open", "/proc/self/ns/net");
    int fd_a = open_tun_in(home, argv[1], argv[2]);
    int fd_b = open_tun_in(home, argv[3], argv[4]);
    close(home);

    struct queue q[2];
    queue_init(&q[0], "a", fd_a, fd_b, mtu, queue_bytes);
    queue_init(&q[1], "b", fd_b, fd_a, mtu, queue_bytes);
    unsigned char *scratch = malloc(MAX_PACKET);
    char cmd[4096];
    size_t cmd_used = 0;
    if (!scratch)
        die("out of memory", NULL);
    printf("ready\n");
    fflush(stdout);

    for (;;) {
        uint64_t next = 0;
        for (int i = 0; i < 2; i++) {
            uint64_t due = queue_drain(&q[i]);
            if (due && (!next || due < next))
                next = due;
        }
        struct pollfd fds[3] = {
            {.fd = fd_a, .events = POLLIN},
            {.fd = fd_b, .events = POLLIN},
            {.fd = STDIN_FILENO, .events = POLLIN},
        };
        struct timespec ts, *timeout = NULL;
        if (next) {
            uint64_t now = now_ns(), wait = next > now ? next - now : 0;
            ts.tv_sec = (time_t)(wait / 1000000000u);
            ts.tv_nsec = (long)(wait % 1000000000u);
            timeout = &ts;
        }
        if (ppoll(fds, 3, timeout, NULL) < 0) {
            if (errno == EINTR)
                continue;
            die("ppoll", NULL);
        }
        for (int i = 0; i < 2; i++) {
            if (fds[i].revents & (POLLERR | POLLHUP | POLLNVAL)) {
                fprintf(stderr, "delayline: device of site %s is gone\n", q[i].name);
                return 1;
            }
            if (fds[i].revents & POLLIN)
                queue_fill(&q[i], scratch);
        }
        if (fds[2].revents & (POLLIN | POLLHUP | POLLERR))
            if (!read_commands(q, cmd, &cmd_used, sizeof cmd))
                return 0;
    }
}
