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

use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use redis::{aio::ConnectionManager, Cmd, Pipeline, RedisResult, Value};
use tokio::sync::{mpsc, oneshot};

/// Most commands written as one pipeline (more wait for the next one).
const MAX_BATCH: usize = 64;

/// What a caller queues: one command, or commands that run as one transaction (`MULTI` …
/// `EXEC`, so that no other client's command runs between them), answered by `EXEC`'s reply.
pub(crate) enum Unit {
    One(Cmd),
    Transaction(Vec<Cmd>),
}

impl Unit {
    /// Appends the unit to `pipe`; returns how many replies it will have (its answer is the last).
    pub(crate) fn add_to(self, pipe: &mut Pipeline) -> usize {
        match self {
            Unit::One(cmd) => {
                pipe.add_command(cmd);
                1
            }
            Unit::Transaction(cmds) => {
                let n = cmds.len() + 2;
                pipe.cmd("MULTI");
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                pipe.cmd("EXEC");
                n
            }
        }
    }
}

struct Job {
    unit: Unit,
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
    /// Starts the pump on the current tokio runtime. A pipeline not answered within `deadline`
    /// (the callers' own timeout) is dropped: while the connection is down, redis-rs holds its
    /// commands until it reconnects, and a claim written then, with nobody waiting for it, would
    /// hold its key for a whole lease.
    pub(crate) fn start(conn: ConnectionManager, deadline: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(pump(rx, conn, deadline));
        Self { tx }
    }

    /// Queues `unit` and waits for its own answer (a Redis error answered to it alone stays its
    /// own; a failure of the whole write is every queued caller's).
    pub(crate) async fn call(&self, unit: Unit) -> Result<RedisResult<Value>, PumpGone> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Job { unit, reply }).map_err(|_| PumpGone)?;
        rx.await.map_err(|_| PumpGone)
    }
}

async fn pump(mut rx: mpsc::UnboundedReceiver<Job>, conn: ConnectionManager, deadline: Duration) {
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
                    in_flight.push(send(conn.clone(), jobs, deadline));
                }
            }
        }
    }
    // The store is gone: let what is already written finish and answer its callers.
    while in_flight.next().await.is_some() {}
}

/// A reply as its caller's answer: an error reply is an error; an error inside an `EXEC` reply
/// (`WRONGTYPE` of one command, say) stays inside, for the caller to read.
pub(crate) fn answer(v: Value) -> RedisResult<Value> {
    match v {
        Value::ServerError(e) => Err(e.into()),
        v => Ok(v),
    }
}

async fn send(mut conn: ConnectionManager, mut jobs: Vec<Job>, deadline: Duration) {
    let late =
        || redis::RedisError::from((redis::ErrorKind::Io, "no answer within the store's timeout"));
    crate::telemetry::pipeline(jobs.len());
    if let [Job {
        unit: Unit::One(_), ..
    }] = jobs.as_slice()
    {
        if let Some(Job {
            unit: Unit::One(cmd),
            reply,
        }) = jobs.pop()
        {
            let r = tokio::time::timeout(deadline, cmd.query_async::<Value>(&mut conn)).await;
            let _ = reply.send(r.unwrap_or_else(|_| Err(late())));
        }
        return;
    }
    // Sized for transactions of two commands (a claim: four replies), so it does not grow.
    let mut pipe = Pipeline::with_capacity(jobs.len() * 4);
    // Each command's error (NOSCRIPT, say) goes to its caller alone.
    pipe.ignore_errors();
    let mut replies = Vec::with_capacity(jobs.len());
    let mut expected = 0;
    for job in jobs {
        let n = job.unit.add_to(&mut pipe);
        expected += n;
        replies.push((job.reply, n));
    }
    let r = tokio::time::timeout(deadline, pipe.query_async::<Vec<Value>>(&mut conn)).await;
    match r.unwrap_or_else(|_| Err(late())) {
        Ok(values) if values.len() == expected => {
            let mut values = values.into_iter();
            for (reply, n) in replies {
                // A unit's last reply answers it: its command's, or its transaction's `EXEC`.
                if let Some(v) = values.by_ref().take(n).last() {
                    let _ = reply.send(answer(v));
                }
            }
        }
        Ok(values) => {
            let e = redis::RedisError::from((
                redis::ErrorKind::Parse,
                "pipeline answered a different number of replies",
                format!("{} for {expected} commands", values.len()),
            ));
            for (reply, _) in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            for (reply, _) in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
