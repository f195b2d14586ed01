"""Two hot Python functions, 70/30: seventy() runs 7 units of work() for every 3 that
thirty() runs. Waits for a line on stdin, prints "go", runs argv[1] rounds and exits
(a fixed amount of work, however busy the machine is)."""
import sys

UNIT = 10_000


def work(n):
    x = 0
    for i in range(n):
        x = (x * 31 + i) & 0xFFFFFFFF
    return x


def seventy():
    return work(7 * UNIT)


def thirty():
    return work(3 * UNIT)


def main():
    rounds = int(sys.argv[1])
    sys.stdin.readline()
    print("go", flush=True)
    for _ in range(rounds):
        seventy()
        thirty()


main()
