/* relay: the smallest TCP-in-UDP tunnel end, a yardstick for scripts/bench (not part of
 * udp-encap-tun).  One poll, then at most one tun read and one UDP read per wake-up, as the
 * C original does; its request/response rate shows what any user-space relay reaches on
 * the machine at hand.
 *
 *   relay c TUN DEV PORT LOCAL        client: TX to the packet's destination at PORT;
 *                                     RX source = the datagram's source address
 *   relay s TUN DEV PORT LOCAL PEER   server: TX to the last peer heard from; RX source = PEER
 *
 * TUN is created (IFF_TUN | IFF_NO_PI); the bench gives it addresses and routes.  DEV is
 * the interface the UDP socket is bound to; LOCAL is the RX destination address.  Only
 * IPv4/TCP with a 20-byte header is relayed; RX packets get TTL 64, DF and a TCP checksum
 * computed here.  Built by scripts/bench at run time: gcc -O2 -o relay relay.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

static uint32_t sum16(const uint8_t *p, size_t n, uint32_t s)
{
    for (; n > 1; p += 2, n -= 2)
        s += (uint32_t)p[0] << 8 | p[1];
    if (n)
        s += (uint32_t)p[0] << 8;
    return s;
}

static uint16_t fold(uint32_t s)
{
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint16_t)~s;
}

int main(int argc, char **argv)
{
    if (argc < 6 || (argv[1][0] == 's' && argc < 7)) {
        fprintf(stderr, "usage: relay c|s TUN DEV PORT LOCAL [PEER]\n");
        return 2;
    }
    int server = argv[1][0] == 's';
    int port = atoi(argv[4]);
    struct in_addr local, peer_addr = {0};
    if (!inet_aton(argv[5], &local) || (server && !inet_aton(argv[6], &peer_addr))) {
        fprintf(stderr, "relay: bad address\n");
        return 2;
    }
    int tun = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    struct ifreq ifr = {.ifr_flags = IFF_TUN | IFF_NO_PI};
    strncpy(ifr.ifr_name, argv[2], IFNAMSIZ - 1);
    if (tun < 0 || ioctl(tun, TUNSETIFF, &ifr) < 0) {
        perror("relay: tun");
        return 1;
    }
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in me = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (setsockopt(s, SOL_SOCKET, SO_BINDTODEVICE, argv[3], strlen(argv[3])) < 0 ||
        bind(s, (struct sockaddr *)&me, sizeof me) < 0) {
        perror("relay: socket");
        return 1;
    }
    static uint8_t buf[20 + 65536];
    struct sockaddr_in peer = {0};
    uint16_t ident = 0;
    struct pollfd fds[2] = {{.fd = tun, .events = POLLIN}, {.fd = s, .events = POLLIN}};
    for (;;) {
        if (poll(fds, 2, -1) < 0)
            continue;
        if (fds[0].revents & POLLIN) { /* TX: strip the IPv4 header */
            ssize_t n = read(tun, buf, sizeof buf);
            if (n >= 40 && buf[0] == 0x45 && buf[9] == IPPROTO_TCP) {
                struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
                memcpy(&to.sin_addr, buf + 16, 4);
                if (server)
                    to = peer;
                if (to.sin_port)
                    sendto(s, buf + 20, n - 20, 0, (struct sockaddr *)&to, sizeof to);
            }
        }
        if (fds[1].revents & POLLIN) { /* RX: a TCP segment gets an IPv4 header */
            struct sockaddr_in from;
            socklen_t fl = sizeof from;
            ssize_t n = recvfrom(s, buf + 20, sizeof buf - 20, 0, (struct sockaddr *)&from, &fl);
            if (n < 20)
                continue;
            struct in_addr src = server ? peer_addr : from.sin_addr;
            if (server)
                peer = from;
            uint8_t *ip = buf, *tcp = buf + 20;
            uint16_t total = (uint16_t)(n + 20), c;
            ident++;
            memcpy(ip, (uint8_t[]){0x45, 0, total >> 8, total & 0xff, ident >> 8, ident & 0xff,
                                   0x40, 0, 64, IPPROTO_TCP, 0, 0}, 12);
            memcpy(ip + 12, &src, 4);
            memcpy(ip + 16, &local, 4);
            c = fold(sum16(ip, 20, 0));
            ip[10] = c >> 8, ip[11] = c & 0xff;
            tcp[16] = tcp[17] = 0;
            c = fold(sum16(tcp, n, sum16(ip + 12, 8, IPPROTO_TCP + (uint32_t)n)));
            tcp[16] = c >> 8, tcp[17] = c & 0xff;
            write(tun, buf, total);
        }
    }
}
