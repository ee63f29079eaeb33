//! Automatic pipelining of the store's scripts over its one multiplexed connection.
//!
//! Every request's claim and completion is one small command. Sent one by one, each costs a
//! `writev` on this side and a read and a write in Redis: on a busy service the kernel's TCP work
//! for them outweighs the scripts themselves. The pump gathers the commands that callers queued
//! since it last ran (it lets the tasks that are ready run first) and writes them as one pipeline,
//! so a burst of N requests costs one write and one reply read instead of N. Alone (c = 1: nothing
//! in flight, and the last pipeline held one command), a command goes out at once, as itself,
//! without that pass of the event loop.
//!
//! Commands whose caller has already given up (timed out, dropped) while queued are not sent: a
//! claim nobody waits for would only hold its key for a lease.

use futures_util::stream::{FuturesUnordered, StreamExt};
use redis::{aio::ConnectionManager, Cmd, RedisResult, Value};
use tokio::sync::{mpsc, oneshot};

/// Most commands written as one pipeline (more wait for the next one).
const MAX_BATCH: usize = 64;

struct Job {
    cmd: Cmd,
    reply: oneshot::Sender<RedisResult<Value>>,
}

/// The caller's side of the pump: cheap to clone; the pump ends when the last clone is dropped.
#[derive(Clone)]
pub(crate) struct Batcher {
    tx: mpsc::UnboundedSender<Job>,
}

/// Why a queued command got no answer from the pump.
#[derive(Debug)]
pub(crate) struct PumpGone;

impl Batcher {
    /// Starts the pump on the current tokio runtime.
    pub(crate) fn start(conn: ConnectionManager) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(pump(rx, conn));
        Self { tx }
    }

    /// Queues `cmd` and waits for its own answer (a Redis error answered to it alone stays its
    /// own; a failure of the whole write is every queued caller's).
    pub(crate) async fn call(&self, cmd: Cmd) -> Result<RedisResult<Value>, PumpGone> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Job { cmd, reply }).map_err(|_| PumpGone)?;
        rx.await.map_err(|_| PumpGone)
    }
}

async fn pump(mut rx: mpsc::UnboundedReceiver<Job>, conn: ConnectionManager) {
    let mut in_flight = FuturesUnordered::new();
    // Commands in the last pipeline written: whether callers are coming in company.
    let mut last = 0;
    loop {
        tokio::select! {
            // Answers first: they free callers, and the queue only grows meanwhile.
            biased;
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            job = rx.recv() => {
                let Some(first) = job else { break };
                // In company (commands in flight, or the last pipeline held several), let every
                // task that is ready now queue its command behind this one. Alone (c = 1), the
                // yield would only cost a pass of the runtime's event loop: write at once.
                if last > 1 || !in_flight.is_empty() {
                    tokio::task::yield_now().await;
                }
                let mut jobs = Vec::with_capacity(8);
                jobs.extend(Some(first).filter(|j| !j.reply.is_closed()));
                while jobs.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(j) if j.reply.is_closed() => {}
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
                last = jobs.len();
                if !jobs.is_empty() {
                    in_flight.push(send(conn.clone(), jobs));
                }
            }
        }
    }
    // The store is gone: let what is already written finish and answer its callers.
    while in_flight.next().await.is_some() {}
}

async fn send(mut conn: ConnectionManager, mut jobs: Vec<Job>) {
    crate::telemetry::pipeline(jobs.len());
    if jobs.len() == 1 {
        if let Some(job) = jobs.pop() {
            let r = job.cmd.query_async::<Value>(&mut conn).await;
            let _ = job.reply.send(r);
        }
        return;
    }
    let mut pipe = redis::pipe();
    // Each command's error (NOSCRIPT, say) goes to its caller alone.
    pipe.ignore_errors();
    let mut replies = Vec::with_capacity(jobs.len());
    for job in jobs {
        pipe.add_command(job.cmd);
        replies.push(job.reply);
    }
    match pipe.query_async::<Vec<Value>>(&mut conn).await {
        Ok(values) if values.len() == replies.len() => {
            for (v, reply) in values.into_iter().zip(replies) {
                let _ = reply.send(v.extract_error());
            }
        }
        Ok(values) => {
            let e = redis::RedisError::from((
                redis::ErrorKind::Parse,
                "pipeline answered a different number of replies",
                format!("{} for {} commands", values.len(), replies.len()),
            ));
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
