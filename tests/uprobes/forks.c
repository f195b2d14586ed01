/* For the inherited-uprobe test: waits for a line on stdin, calls marker() PARENT
 * times, forks a child that calls it CHILD times (and a grandchild that calls it
 * GRANDCHILD times), waits for both, prints "parent child grandchild" pids. With a
 * fourth argument AFTER, once both have exited (and 200 ms more), the parent calls it
 * AFTER times more and forks a second child that calls it AFTER times, whose pid is
 * printed fourth. Built at test time; nothing built is committed. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/wait.h>

__attribute__((noinline)) int marker(int x) { return x + 1; }

static void calls(int n) { volatile int s = 0; for (int i = 0; i < n; i++) s += marker(i); }

int main(int argc, char **argv)
{
    int parent = atoi(argv[1]), child = atoi(argv[2]), grandchild = atoi(argv[3]);
    int after = argc > 4 ? atoi(argv[4]) : -1;
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    calls(parent);
    int fds[2];
    if (pipe(fds))
        return 1;
    pid_t c = fork();
    if (c == 0) {
        calls(child);
        pid_t g = fork();
        if (g == 0) {
            calls(grandchild);
            _exit(0);
        }
        waitpid(g, 0, 0);
        if (write(fds[1], &g, sizeof g) != sizeof g)
            _exit(1);
        _exit(0);
    }
    pid_t g = 0;
    waitpid(c, 0, 0);
    if (read(fds[0], &g, sizeof g) != sizeof g)
        return 1;
    if (after < 0) {
        printf("%d %d %d\n", getpid(), c, g);
        return 0;
    }
    usleep(200000);
    calls(after);
    pid_t c2 = fork();
    if (c2 == 0) {
        calls(after);
        _exit(0);
    }
    waitpid(c2, 0, 0);
    printf("%d %d %d %d\n", getpid(), c, g, c2);
    return 0;
}
