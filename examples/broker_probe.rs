//! What a broker's cost scales with: the same bytes written and read back as many small records
//! or as few large ones. Produces `COUNT` records of `SIZE` bytes to a new 4-partition topic in
//! transactions of `PER_TXN` records (as the processor writes, `read_committed` behind it), then
//! reads them all back from the beginning (as a restore reads a changelog), timing both and,
//! given the broker's pid, its CPU seconds for each (from `/proc`).
//!
//! ```sh
//! cargo run --release --example broker_probe -- 127.0.0.1:9092 probe-small 600000 100 6000 <broker pid>
//! cargo run --release --example broker_probe -- 127.0.0.1:9092 probe-large 6000 10000 60 <broker pid>
//! ```
//!
//! Run each case on a fresh broker: the stand-in slows as its log grows. The README's
//! *What a restore waited for* gives what it measured.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

const PARTITIONS: i32 = 4;

/// CPU seconds (user + system) of process `pid` so far.
fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).context("short /proc stat")?.parse::<f64>()?)
    };
    // utime and stime, in clock ticks (100 a second on Linux).
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bootstrap, topic, count, size, per_txn, pid] = args.as_slice() else {
        bail!("usage: broker_probe BOOTSTRAP TOPIC COUNT SIZE PER_TXN BROKER_PID");
    };
    let (count, size, per_txn): (usize, usize, usize) =
        (count.parse()?, size.parse()?, per_txn.parse()?);

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let rt = tokio::runtime::Runtime::new()?;
    let created = rt.block_on(admin.create_topics(
        &[NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1))],
        &AdminOptions::new(),
    ))?;
    for r in created {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }

    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", format!("broker-probe-{topic}"))
        .set("linger.ms", "5")
        .create()?;
    producer.init_transactions(Duration::from_secs(30))?;
    let payload = vec![0x5Au8; size];
    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    let mut sent = 0;
    while sent < count {
        producer.begin_transaction()?;
        for _ in 0..per_txn.min(count - sent) {
            let key = format!("key-{sent:012}");
            let partition = (sent % PARTITIONS as usize) as i32;
            loop {
                let record = BaseRecord::to(topic)
                    .partition(partition)
                    .key(&key)
                    .payload(&payload);
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(_), _)) => {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err((e, _)) => return Err(e.into()),
                }
            }
            sent += 1;
        }
        producer.commit_transaction(Duration::from_secs(60))?;
    }
    let produce_s = started.elapsed().as_secs_f64();
    let produce_cpu = cpu_seconds(pid)? - cpu_before;

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("broker-probe-{topic}"))
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        // As the restorer reads: the next fetch as soon as the prefetch queue has room
        // (librdkafka's default waits a second), and the leader known before the partitions
        // are assigned (else each offset lookup waits for a 500 ms retry timer).
        .set("fetch.queue.backoff.ms", "5")
        .create()?;
    consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    let (mut records, mut bytes, mut ended) = (0usize, 0usize, 0);
    while ended < PARTITIONS {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                records += 1;
                bytes += m.payload_len();
            }
            Some(Err(KafkaError::PartitionEOF(_))) => ended += 1,
            Some(Err(e)) => eprintln!("read: {e}"),
            None => {}
        }
    }
    println!(
        "{count} records of {size} B, {per_txn} a transaction: produced in {produce_s:.2} s \
         (broker CPU {produce_cpu:.2} s); read {records} records ({bytes} B) in {:.2} s \
         (broker CPU {:.2} s)",
        started.elapsed().as_secs_f64(),
        cpu_seconds(pid)? - cpu_before
    );
    Ok(())
}
