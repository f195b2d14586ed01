/* Known shares for the profiler tests: each round spends 6 units in main -> a -> b -> c
 * and 4 units in main -> d, the same loop body in both, so c holds 60 % of the samples
 * and d 40 %. Waits for a line on stdin before it starts (so the profilers attach
 * first), prints "go", runs argv[1] rounds and exits: a fixed amount of work, so a
 * profile of the whole run has as many samples however busy the machine is. Built at
 * test time with -O0 -fno-omit-frame-pointer (GCC 12 gives a leaf that needs no stack
 * no frame even with -fno-omit-frame-pointer at -O1), and for the hostile cases
 * stripped or at -O1 without frame pointers; nothing built is committed. */
#include <stdio.h>
#include <stdlib.h>

#define UNIT 1000000UL

volatile unsigned long sink;

__attribute__((noinline)) void c(void) { for (unsigned long i = 0; i < 6 * UNIT; i++) sink += i; }
__attribute__((noinline)) void b(void) { c(); sink++; }
__attribute__((noinline)) void a(void) { b(); sink++; }
__attribute__((noinline)) void d(void) { for (unsigned long i = 0; i < 4 * UNIT; i++) sink += i; }

int main(int argc, char **argv)
{
    long rounds = argc > 1 ? atol(argv[1]) : 100;
    char line[64];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    puts("go");
    fflush(stdout);
    for (long r = 0; r < rounds; r++) {
        a();
        d();
    }
    return 0;
}
