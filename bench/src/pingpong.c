/* One TCP loopback connection, N one-byte send+recv round trips in one thread: the
 * cheapest socket work there is, so a hook's per-event cost shows clearly. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
  int n = atoi(argv[1]);
  int l = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000001)};
  socklen_t al = sizeof a;
  bind(l, (void *)&a, sizeof a); listen(l, 1); getsockname(l, (void *)&a, &al);
  int c = socket(AF_INET, SOCK_STREAM, 0);
  connect(c, (void *)&a, sizeof a);
  int s = accept(l, 0, 0);
  int one = 1; setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  char buf[64];
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < n; i++) { send(c, buf, 1, 0); recv(s, buf, 1, 0); }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  printf("%.1f ns/iter\n", ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / n);
}
