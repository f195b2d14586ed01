/* Off-CPU ground truth: after a line on stdin, ten nanosleep(100 ms) calls (1.0 s
 * blocked in all), then "done", then it blocks reading stdin until closed. */
#include <stdio.h>
#include <time.h>

__attribute__((noinline)) void sleep_tenth(void)
{
    struct timespec ts = {0, 100000000};
    nanosleep(&ts, NULL);
}

int main(void)
{
    char line[64];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    for (int i = 0; i < 10; i++)
        sleep_tenth();
    puts("done");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin))
        ;
    return 0;
}
