/* rr: one-byte TCP request/response benchmark (a tiny stand-in for netperf TCP_RR).
 *
 *   rr -s PORT                      server: echo every byte back, one child per connection
 *   rr -c HOST PORT SECONDS         client: send 1 byte, wait for 1 byte, repeat for SECONDS;
 *                                   prints {"transactions": N, "seconds": S, "rate": N/S}
 *
 * Both ends set TCP_NODELAY.  The client gives up (exit 1, message on stderr) if it cannot
 * connect within 3 s or if an answer takes longer than 2 s, so a broken path cannot hang it.
 * Built by scripts/bench at run time: gcc -O2 -o rr rr.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static int serve(int port)
{
    int one = 1;
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (ls < 0) { perror("socket"); return 1; }
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
    if (listen(ls, 16) < 0) { perror("listen"); return 1; }
    signal(SIGCHLD, SIG_IGN); /* no zombies */
    fprintf(stderr, "rr: listening on port %d\n", port);
    for (;;) {
        int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            perror("accept");
            return 1;
        }
        pid_t pid = fork();
        if (pid == 0) {
            char buf[256];
            struct timeval tv = {.tv_sec = 60}; /* a vanished client frees the child */
            close(ls);
            nodelay(c);
            setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
            for (;;) {
                ssize_t n = read(c, buf, sizeof buf);
                if (n <= 0) break;
                if (write(c, buf, n) != n) break;
            }
            _exit(0);
        }
        close(c);
    }
}

static int client(const char *host, int port, double seconds)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "rr: bad address %s\n", host);
        return 2;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) { perror("socket"); return 1; }
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS) {
        perror("rr: connect");
        return 1;
    }
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    int err = 0;
    socklen_t len = sizeof err;
    if (poll(&p, 1, 3000) != 1) { fprintf(stderr, "rr: connect timed out\n"); return 1; }
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) { fprintf(stderr, "rr: connect: %s\n", strerror(err)); return 1; }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    nodelay(fd);
    struct timeval tv = {.tv_sec = 2};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);

    char b = 'x';
    unsigned long long count = 0;
    double start = now(), end = start + seconds, t = start;
    for (;;) {
        if (write(fd, &b, 1) != 1) { perror("rr: write"); return 1; }
        ssize_t n = read(fd, &b, 1);
        if (n != 1) {
            fprintf(stderr, "rr: read: %s\n", n == 0 ? "connection closed" :
                    errno == EAGAIN ? "no answer within 2 s" : strerror(errno));
            return 1;
        }
        count++;
        if ((count & 63) == 0 && (t = now()) >= end) break;
    }
    close(fd);
    double elapsed = t - start;
    printf("{\"transactions\": %llu, \"seconds\": %.6f, \"rate\": %.1f}\n",
           count, elapsed, count / elapsed);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "-s") == 0)
        return serve(atoi(argv[2]));
    if (argc == 5 && strcmp(argv[1], "-c") == 0)
        return client(argv[2], atoi(argv[3]), atof(argv[4]));
    fprintf(stderr, "usage: rr -s PORT | rr -c HOST PORT SECONDS\n");
    return 2;
}
