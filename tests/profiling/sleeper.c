/* Off-CPU ground truth: after a line on stdin, ten nanosleep(100 ms) calls (1.0 s
 * asked for), then "done <ns>" with the time they took by its own clock (a busy machine
 * adds the wait for a CPU after each wakeup), then it blocks reading stdin until closed. */
#include <stdio.h>
#include <time.h>

__attribute__((noinline)) void sleep_tenth(void)
{
    struct timespec ts = {0, 100000000};
    nanosleep(&ts, NULL);
}

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(void)
{
    char line[64];
    long long slept = 0;
    if (!fgets(line, sizeof line, stdin))
        return 1;
    for (int i = 0; i < 10; i++) {
        long long t0 = now_ns();
        sleep_tenth();
        slept += now_ns() - t0;
    }
    printf("done %lld\n", slept);
    fflush(stdout);
    while (fgets(line, sizeof line, stdin))
        ;
    return 0;
}
