// A tiny DataStream job for `python -m runners.flink check`: it submits
// through RemoteStreamEnvironment like Beam's Flink job server, so a pass
// shows the local cluster accepts, schedules and finishes jobs.
// Args: HOST PORT JAR N; prints "SUM <2 * (1 + ... + N)>".
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import java.util.List;


public class SmokeJob {
  public static void main(String[] args) throws Exception {
    StreamExecutionEnvironment env = StreamExecutionEnvironment.createRemoteEnvironment(
        args[0], Integer.parseInt(args[1]), args[2]);
    long n = Long.parseLong(args[3]);
    DataStream<Long> s = env.fromSequence(1, n).map(x -> x * 2).returns(Types.LONG);
    List<Long> out = s.executeAndCollect("rtml-smoke", (int) n);
    long sum = 0;
    for (long v : out) sum += v;
    System.out.println("SUM " + sum);
  }
}
