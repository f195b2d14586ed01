/* Two hot methods, 70/30: hotSeventy() runs 7 units of the same loop for every 3 that
 * hotThirty() runs. Warms up with 20,000 calls of each (the JIT compiles both), prints "warm",
 * waits for a line on stdin (so the profiler is attached), runs args[0] rounds and
 * exits: a fixed amount of work, however busy the machine is. Run with
 * -XX:+PreserveFramePointer and -XX:CompileCommand=dontinline,Shares::hot* so each
 * keeps a frame of its own. */
public class Shares {
    // Small units, many calls: the JIT compiles a method after thousands of calls, and an
    // interpreted method shows only as "Interpreter" (the perf map names compiled code).
    static final long UNIT = 10_000L;
    static long sink;

    static long work(long n) {
        long x = sink;
        for (long i = 0; i < n; i++) {
            x = x * 6364136223846793005L + 1442695040888963407L;
        }
        return x;
    }

    static void hotSeventy() { sink ^= work(7 * UNIT); }

    static void hotThirty() { sink ^= work(3 * UNIT); }

    public static void main(String[] args) throws java.io.IOException {
        long rounds = Long.parseLong(args[0]);
        for (int i = 0; i < 20_000; i++) {  // past C2's invocation thresholds, however slow the machine
            hotSeventy();
            hotThirty();
        }
        try {
            Thread.sleep(1000);  // the compiler threads install what they compiled
        } catch (InterruptedException e) {
            return;
        }
        System.out.println("warm");
        System.out.flush();
        new java.io.BufferedReader(new java.io.InputStreamReader(System.in)).readLine();
        for (long r = 0; r < rounds; r++) {
            hotSeventy();
            hotThirty();
        }
        System.out.println(sink == 42 ? "" : "end");
    }
}
