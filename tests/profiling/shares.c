/* Known shares for the profiler tests: each round spends 6 units in main -> a -> b -> c
 * and 4 units in main -> d, the same loop body in both, so c holds 60 % of the samples
 * and d 40 %. Waits for a line on stdin before it starts (so the profilers attach
 * first), prints "go" and runs for argv[1] seconds. Built at test time with -O0
 * -fno-omit-frame-pointer (GCC 12 gives a leaf that needs no stack no frame even with
 * -fno-omit-frame-pointer at -O1), and for the hostile cases stripped or at -O1
 * without frame pointers; nothing built is committed. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define UNIT 1000000UL

volatile unsigned long sink;

__attribute__((noinline)) void c(void) { for (unsigned long i = 0; i < 6 * UNIT; i++) sink += i; }
__attribute__((noinline)) void b(void) { c(); sink++; }
__attribute__((noinline)) void a(void) { b(); sink++; }
__attribute__((noinline)) void d(void) { for (unsigned long i = 0; i < 4 * UNIT; i++) sink += i; }

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 10;
    char line[64];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    puts("go");
    fflush(stdout);
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    do {
        a();
        d();
        clock_gettime(CLOCK_MONOTONIC, &t);
    } while ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 < seconds);
    return 0;
}
