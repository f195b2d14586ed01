/* Two hot methods, 70/30: hotSeventy() runs 7 units of the same loop for every 3 that
 * hotThirty() runs. Prints "warm" after two seconds (the JIT has compiled both by
 * then) and runs for args[0] seconds. Run with -XX:+PreserveFramePointer and
 * -XX:CompileCommand=dontinline,Shares::hot* so each keeps a frame of its own. */
public class Shares {
    static final long UNIT = 1_000_000L;
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

    public static void main(String[] args) {
        long start = System.nanoTime();
        long end = start + (long) (Double.parseDouble(args[0]) * 1e9);
        boolean announced = false;
        while (System.nanoTime() < end) {
            hotSeventy();
            hotThirty();
            if (!announced && System.nanoTime() - start > 2_000_000_000L) {
                System.out.println("warm");
                System.out.flush();
                announced = true;
            }
        }
        System.out.println(sink == 42 ? "" : "end");
    }
}
