//! The crash-equivalence harness: processors as child processes (`kscore run`) that a test
//! starts, stops, SIGKILLs and restarts while simulated input arrives, and the comparison of
//! their committed output with an uninterrupted run over the same input.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use kscore::cluster::ClusterArgs;
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::{committed_total, read, wait_committed};

/// One pipeline's topics and group, and its topology file.
pub struct Pipeline {
    pub group: String,
    pub scored: String,
    pub dlq: String,
    pub file: PathBuf,
}

/// The shipped topology reading `input`, with outputs and group named `<name>-…-<run>`, written
/// to `dir` with absolute paths so a child process can load it from anywhere.
pub fn pipeline(dir: &Path, input: &str, name: &str, run: &str) -> Pipeline {
    let root = std::env::current_dir().unwrap();
    let text = std::fs::read_to_string("topologies/fraud.toml").unwrap();
    let group = format!("{name}-group-{run}");
    let scored = format!("{name}-scored-{run}");
    let dlq = format!("{name}-dlq-{run}");
    let mut replaced = text.clone();
    for (from, to) in [
        (
            "topic = \"payments\"".to_string(),
            format!("topic = \"{input}\""),
        ),
        (
            "group = \"kscore-fraud\"".to_string(),
            format!("group = \"{group}\""),
        ),
        ("\"payments-scored\"".to_string(), format!("\"{scored}\"")),
        (
            "\"payments-alerts\"".to_string(),
            format!("\"{name}-alerts-{run}\""),
        ),
        ("\"payments-dlq\"".to_string(), format!("\"{dlq}\"")),
        ("\"../".to_string(), format!("\"{}/", root.display())),
    ] {
        assert!(replaced.contains(&from), "fraud.toml no longer has {from}");
        replaced = replaced.replace(&from, &to);
    }
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, replaced).unwrap();
    Pipeline {
        group,
        scored,
        dlq,
        file,
    }
}

/// Runs `scripts/stack.sh <command>` on the test stack (the broker tests stop, start and
/// restart its broker).
pub fn stack(command: &str) {
    assert!(
        std::env::var_os("KSCORE_STACK_NAME").is_some(),
        "this test drives the local stack's broker: run it through scripts/test.sh"
    );
    let status = Command::new("scripts/stack.sh")
        .arg(command)
        .status()
        .unwrap();
    assert!(status.success(), "scripts/stack.sh {command} failed");
}

/// Simulated payments to `topic` (4 partitions, keyed by card) from 200 cards
/// (`KSCORE_CRASH_CARDS`): paced at `rate`
/// per second of wall clock (and event time), or, with `rate` 0, all at once at one payment per
/// second of event time from `start` (about 18 per card an hour, so the windows matter).
pub fn simulate(topic: &str, count: u64, rate: f64, seed: u64, start: Option<&str>) -> Child {
    let cards = std::env::var("KSCORE_CRASH_CARDS").unwrap_or("200".into());
    simulate_cards(topic, count, rate, seed, start, &cards)
}

/// [`simulate`] with `cards` cards.
pub fn simulate_cards(
    topic: &str,
    count: u64,
    rate: f64,
    seed: u64,
    start: Option<&str>,
    cards: &str,
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kscore"))
        .args(["simulate", "--topic", topic, "--partitions", "4"])
        .args(["--seed", &seed.to_string()])
        .args(["--cards", cards])
        .args(["--event-rate", "1", "--fraud-per-10k", "50"])
        .args(["--count", &count.to_string()])
        .args(if rate > 0.0 {
            vec!["--rate".to_string(), rate.to_string()]
        } else {
            vec![]
        })
        .args(
            start
                .map(|s| vec!["--start".to_string(), s.to_string()])
                .unwrap_or_default(),
        )
        .args(["--progress", "1h"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Processor instances of one pipeline, by instance id, with their logs kept in `dir`.
pub struct Instances<'a> {
    pipeline: &'a Pipeline,
    dir: PathBuf,
    running: HashMap<String, Child>,
    /// Each running instance's log.
    logs: HashMap<String, PathBuf>,
    starts: usize,
}

impl<'a> Instances<'a> {
    pub fn new(pipeline: &'a Pipeline, dir: &Path) -> Self {
        Instances {
            pipeline,
            dir: dir.to_path_buf(),
            running: HashMap::new(),
            logs: HashMap::new(),
            starts: 0,
        }
    }

    /// Starts instance `id` (its `transactional.id` is derived from it).
    pub fn start(&mut self, id: &str) {
        self.start_with(id, &[]);
    }

    /// Starts instance `id` with extra `kscore run` arguments.
    pub fn start_with(&mut self, id: &str, extra: &[&str]) {
        assert!(!self.running.contains_key(id), "{id} is already running");
        self.starts += 1;
        let path = self.dir.join(format!("{id}-{}.log", self.starts));
        let log = std::fs::File::create(&path).unwrap();
        self.logs.insert(id.to_string(), path);
        let child = Command::new(env!("CARGO_BIN_EXE_kscore"))
            .args(["run", "--topology"])
            .arg(&self.pipeline.file)
            .args(["--instance-id", id])
            // A member killed without leaving is noticed after the session timeout.
            .args([
                "-X",
                "session.timeout.ms=6000",
                "-X",
                "heartbeat.interval.ms=500",
            ])
            // After the defaults, so a test can override them.
            .args(extra)
            .env("RUST_LOG", "info,ort=warn,librdkafka=off,rdkafka=off")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        eprintln!("[harness] started {id} (pid {})", child.id());
        self.running.insert(id.to_string(), child);
    }

    /// SIGKILL: no chance to finish a transaction or leave the group.
    pub fn kill(&mut self, id: &str) {
        let mut child = self.running.remove(id).expect("running");
        self.logs.remove(id);
        child.kill().unwrap();
        child.wait().unwrap();
        eprintln!("[harness] SIGKILLed {id}");
    }

    /// SIGTERM: the instance finishes its cycle and leaves the group. Sent once the instance
    /// has written its first log line: its handler is in place from then on, where a signal
    /// before it (a process not yet at `main`) ends it as the system's default does.
    pub fn stop(&mut self, id: &str) {
        let mut child = self.running.remove(id).expect("running");
        if let Some(log) = self.logs.remove(id) {
            let deadline = Instant::now() + Duration::from_secs(30);
            while std::fs::metadata(&log).map_or(0, |m| m.len()) == 0
                && child.try_wait().unwrap().is_none()
            {
                assert!(Instant::now() < deadline, "{id} wrote nothing in 30 s");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                assert!(s.success(), "{id} exited with {s} on SIGTERM");
                break;
            }
            assert!(Instant::now() < deadline, "{id} did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("[harness] stopped {id}");
    }

    pub fn running(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.running.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Fails if an instance exited on its own.
    pub fn check_alive(&mut self) {
        for (id, child) in &mut self.running {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "instance {id} exited by itself with {status}; logs in {}",
                    self.dir.display()
                );
            }
        }
    }

    pub fn stop_all(&mut self) {
        for id in self.running() {
            self.stop(&id);
        }
    }

    /// Cycles discarded (for a rebalance or a stop) by every start of every instance: (records
    /// gathered, records published in its aborted transaction).
    pub fn discarded(&self) -> Vec<(u64, u64)> {
        self.logged(
            "discarding the cycle in progress",
            &["records=", "published="],
        )
        .into_iter()
        .map(|v| (v[0], v[1]))
        .collect()
    }

    /// Per log line containing `what`, the numbers after each of `names`.
    fn logged(&self, what: &str, names: &[&str]) -> Vec<Vec<u64>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains(what)) {
                let num = |name: &str| -> u64 {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix(name))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                };
                out.push(names.iter().map(|n| num(n)).collect());
            }
        }
        out
    }

    /// Restores logged by every start of every instance: (records read, keys restored).
    pub fn restores(&self) -> Vec<(u64, u64)> {
        self.logged("feature state restored", &["records=", "keys="])
            .into_iter()
            .map(|v| (v[0], v[1]))
            .collect()
    }
}

impl Drop for Instances<'_> {
    fn drop(&mut self) {
        for child in self.running.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Records in `topic`, summed over partitions.
pub fn end_offsets(cluster: &ClusterArgs, topic: &str) -> i64 {
    let consumer: BaseConsumer = cluster.client_config().unwrap().create().unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .unwrap()
                .1
        })
        .sum()
}

/// A scored record without its processing metadata (`processing.processor` and
/// `processing.processed_at`), and its score values apart.
pub struct Scored {
    pub record: Value,
    pub scores: Vec<f64>,
}

/// The committed scored records of a pipeline, by input (partition, offset); panics on a
/// duplicate.
pub fn scored_by_input(
    cluster: &ClusterArgs,
    p: &Pipeline,
    expected: usize,
) -> BTreeMap<(i64, i64), Scored> {
    let records = read(
        cluster,
        &p.scored,
        "read_committed",
        expected,
        Duration::from_secs(60),
    );
    let mut out = BTreeMap::new();
    for r in records {
        let value = super::scored_value(&r.payload);
        let source = super::provenance(&value);
        let Value::Record(fields) = value else {
            panic!("not a record")
        };
        let mut scores = Vec::new();
        let fields = fields
            .into_iter()
            .map(|(name, v)| match (name.as_str(), v) {
                ("processing", Value::Record(proc)) => {
                    let kept: Vec<(String, Value)> = proc
                        .into_iter()
                        .filter(|(n, _)| n != "processor" && n != "processed_at")
                        .collect();
                    (name, Value::Record(kept))
                }
                ("scores", Value::Array(items)) => {
                    let items = items
                        .into_iter()
                        .map(|item| match item {
                            Value::Record(sf) => Value::Record(
                                sf.into_iter()
                                    .map(|(n, v)| match (n.as_str(), v) {
                                        ("value", Value::Double(x)) => {
                                            scores.push(x);
                                            (n, Value::Null)
                                        }
                                        (_, v) => (n, v),
                                    })
                                    .collect(),
                            ),
                            other => other,
                        })
                        .collect();
                    (name, Value::Array(items))
                }
                (_, v) => (name, v),
            })
            .collect();
        let previous = out.insert(
            source,
            Scored {
                record: Value::Record(fields),
                scores,
            },
        );
        assert!(previous.is_none(), "input {source:?} was scored twice");
    }
    out
}

/// The input (partition, offset) a scored record names.
pub fn source_of(payload: &[u8]) -> (i64, i64) {
    super::provenance(&super::scored_value(payload))
}

/// Asserts that two runs' committed outputs are the same: every field equal, bit for bit,
/// except processing metadata and score values; scores equal within 1e-5 relative (ONNX
/// Runtime's float32 matrix kernels round a row's last bits differently by its position in a
/// batch, and batches are cut differently in the two runs).
pub fn assert_same_output(
    cluster: &ClusterArgs,
    reference: &Pipeline,
    under_test: &Pipeline,
    inputs: usize,
) {
    let want = scored_by_input(cluster, reference, inputs);
    let got = scored_by_input(cluster, under_test, inputs);
    assert_eq!(
        want.len(),
        inputs,
        "the reference run scored {} of {inputs}",
        want.len()
    );
    assert_eq!(
        got.len(),
        inputs,
        "the interrupted run scored {} of {inputs}",
        got.len()
    );
    let mut different = 0;
    for (source, w) in &want {
        let g = &got[source];
        let same_scores = w.scores.len() == g.scores.len()
            && w.scores
                .iter()
                .zip(&g.scores)
                .all(|(a, b)| (a - b).abs() <= 1e-5 * a.abs().max(1e-3));
        if g.record != w.record || !same_scores {
            different += 1;
            if different <= 3 {
                eprintln!(
                    "input {source:?} differs:\n  want {:?} {:?}\n  got  {:?} {:?}",
                    w.record, w.scores, g.record, g.scores
                );
            }
        }
    }
    assert_eq!(
        different, 0,
        "{different} of {inputs} scored records differ from the uninterrupted run"
    );
    for p in [reference, under_test] {
        let dead = read(cluster, &p.dlq, "read_committed", 0, Duration::from_secs(3));
        assert!(dead.is_empty(), "{} dead letters in {}", dead.len(), p.dlq);
    }
}

/// Waits for `simulator` to finish producing, checking the instances meanwhile.
pub fn wait_input(simulator: &mut Child, instances: &mut Instances<'_>) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(s) = simulator.try_wait().unwrap() {
            assert!(s.success(), "simulator failed: {s}");
            return;
        }
        instances.check_alive();
        assert!(Instant::now() < deadline, "simulator did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (up to `timeout`) until `p`'s group has committed the whole of `input`, checks no
/// instance died meanwhile, stops them all, and returns their restores (records read, keys).
pub fn finish(
    cluster: &ClusterArgs,
    instances: &mut Instances<'_>,
    input: &str,
    p: &Pipeline,
    timeout: Duration,
) -> Vec<(u64, u64)> {
    wait_committed(cluster, input, &p.group, timeout);
    instances.check_alive();
    instances.stop_all();
    instances.restores()
}

/// Asserts that the input holds `events` records and that `under_test` published exactly what
/// an uninterrupted reference run over the same input publishes.
pub fn assert_same_as_reference(
    cluster: &ClusterArgs,
    reference: &Pipeline,
    under_test: &Pipeline,
    input: &str,
    dir: &Path,
    events: u64,
) {
    reference_run(cluster, reference, input, dir);
    let inputs = end_offsets(cluster, input) as usize;
    assert_eq!(
        inputs as u64, events,
        "the input itself lost or repeated records"
    );
    assert_same_output(cluster, reference, under_test, inputs);
}

/// Runs the reference pipeline, uninterrupted, over the whole input, and stops it.
pub fn reference_run(cluster: &ClusterArgs, p: &Pipeline, input: &str, dir: &Path) {
    let mut one = Instances::new(p, dir);
    one.start("reference");
    wait_committed(cluster, input, &p.group, Duration::from_secs(300));
    one.stop_all();
}

/// A crash-equivalence scenario: one input topic, the pipeline under test and an
/// uninterrupted reference pipeline over the same input, their topologies and logs in one
/// directory.
pub struct Scenario {
    pub cluster: ClusterArgs,
    pub dir: LogDir,
    pub input: String,
    pub under_test: Pipeline,
    pub reference: Pipeline,
}

impl Scenario {
    /// Topics and groups named `<name>-…-<run>` (the reference's `<name>ref-…`).
    pub fn new(name: &str) -> Self {
        let run = super::run_id();
        let dir = LogDir::new();
        let input = format!("{name}-in-{run}");
        let under_test = pipeline(dir.path(), &input, name, &run);
        let reference = pipeline(dir.path(), &input, &format!("{name}ref"), &run);
        Scenario {
            cluster: ClusterArgs::from_env(),
            dir,
            input,
            under_test,
            reference,
        }
    }

    /// Instances of the pipeline under test, logging to the scenario's directory.
    pub fn instances(&self) -> Instances<'_> {
        Instances::new(&self.under_test, self.dir.path())
    }

    /// Waits (up to `timeout`) for the pipeline under test to commit the whole input, then
    /// stops its instances; their restores (records read, keys).
    pub fn finish(&self, instances: &mut Instances<'_>, timeout: Duration) -> Vec<(u64, u64)> {
        finish(
            &self.cluster,
            instances,
            &self.input,
            &self.under_test,
            timeout,
        )
    }

    /// Waits until the pipeline under test has committed what the input holds so far.
    pub fn wait_committed(&self, timeout: Duration) {
        wait_committed(&self.cluster, &self.input, &self.under_test.group, timeout);
    }

    /// Waits until the pipeline under test has committed something, so a later start has
    /// state to restore.
    pub fn wait_some_committed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while committed_total(&self.cluster, &self.input, &self.under_test.group) == 0 {
            assert!(
                Instant::now() < deadline,
                "the pipeline under test committed nothing in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The input holds `events` records and the pipeline under test published exactly what
    /// the reference, run uninterrupted afterwards, publishes.
    pub fn assert_same_as_reference(&self, events: u64) {
        assert_same_as_reference(
            &self.cluster,
            &self.reference,
            &self.under_test,
            &self.input,
            self.dir.path(),
            events,
        );
    }
}

/// A temporary directory for topologies and logs, kept (and named) when the test fails or
/// `KSCORE_KEEP_LOGS` is set.
pub struct LogDir(Option<tempfile::TempDir>);

impl LogDir {
    pub fn new() -> Self {
        LogDir(Some(tempfile::tempdir().unwrap()))
    }

    pub fn path(&self) -> &Path {
        self.0.as_ref().map(tempfile::TempDir::path).unwrap()
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        if (std::thread::panicking() || std::env::var_os("KSCORE_KEEP_LOGS").is_some())
            && let Some(dir) = self.0.take()
        {
            eprintln!("[harness] logs kept in {}", dir.keep().display());
        }
    }
}
