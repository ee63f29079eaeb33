//! The Redis store's own connection: one socket, commands pipelined, replies read by a task.
//!
//! Every request's claim and completion is a small command someone waits for. The pump gathers
//! the commands that callers queued since it last ran (it lets the tasks that are ready run first)
//! and writes them in one write, so a burst of N requests costs one write and one reply read
//! instead of N. Alone (c = 1: nothing in flight, and the last write held one command), a
//! command goes out at once, without that pass of the event loop. A reader task parses the
//! replies (RESP2) and answers each caller in the order written.
//!
//! Why not redis-rs's multiplexed connection: for the store's few fixed reply shapes its
//! general reply parser, sink and connection task cost about 23k instructions per first request,
//! a third of the layer's own work (docs/BENCHMARKS.md). redis-rs still parses the URL and
//! provides the reply and error types.
//!
//! Failure: commands are written only on a live connection, and only for callers still waiting
//! (a claim nobody waits for would only hold its key for a lease). A connection that answers
//! nothing for the reply bound while commands wait is closed, failing them. After a failed
//! connect, calls fail at once for [`RECONNECT_PAUSE`] before the next attempt.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::{Buf, BytesMut};
use redis::{ConnectionAddr, ConnectionInfo, ErrorKind, RedisError, RedisResult, Value};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::{mpsc, oneshot},
    time::Instant,
};

/// Most commands written in one write (more wait for the next one).
const MAX_BATCH: usize = 64;
/// How long calls fail at once after a failed connect, before the next attempt.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
/// Deepest nesting of arrays read in a reply (the store's deepest is 2).
const MAX_DEPTH: usize = 8;
/// Most elements of an array read: the store's replies hold at most three (a transaction's
/// `EXEC`, `TIME`, a script's pair). A longer array, from a broken or hostile server, would be
/// read again from its start on every read while it trickles in.
const MAX_ITEMS: usize = 64;
/// Longest line read (a type byte, a length or a status or error message, and `\r\n`).
const MAX_LINE: usize = 4096;
/// Longest string read: Redis's own limit (`proto-max-bulk-len`).
const MAX_BULK: usize = 512 * 1024 * 1024;

/// Commands that go out together, and which of their replies answer the caller.
pub(crate) struct Unit {
    bytes: Vec<u8>,
    replies: usize,
    keep: usize,
}

impl Unit {
    fn empty(capacity: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(capacity),
            replies: 0,
            keep: 0,
        }
    }

    /// Appends one command (RESP array of bulk strings).
    fn push(&mut self, args: &[&[u8]]) {
        let mut n = itoa::Buffer::new();
        self.bytes.push(b'*');
        self.bytes
            .extend_from_slice(n.format(args.len()).as_bytes());
        self.bytes.extend_from_slice(b"\r\n");
        for a in args.iter() {
            self.bytes.push(b'$');
            self.bytes.extend_from_slice(n.format(a.len()).as_bytes());
            self.bytes.extend_from_slice(b"\r\n");
            self.bytes.extend_from_slice(a);
            self.bytes.extend_from_slice(b"\r\n");
        }
        self.replies += 1;
    }

    fn size(args: &[&[u8]]) -> usize {
        args.iter().map(|a| a.len() + 16).sum::<usize>() + 8
    }

    /// One command, answered by its reply.
    pub(crate) fn one(args: &[&[u8]]) -> Self {
        Self::all(&[args])
    }

    /// Commands run as one transaction (`MULTI` … `EXEC`: no other client's command runs
    /// between them), answered by `EXEC`'s reply.
    pub(crate) fn transaction(cmds: &[&[&[u8]]]) -> Self {
        let size = cmds.iter().map(|c| Self::size(c)).sum::<usize>();
        let mut u = Self::empty(size + 32);
        u.push(&[b"MULTI"]);
        for c in cmds {
            u.push(c);
        }
        u.push(&[b"EXEC"]);
        u.keep = 1;
        u
    }

    /// Commands sent together, answered by all their replies (an array; one command's reply
    /// alone).
    pub(crate) fn all(cmds: &[&[&[u8]]]) -> Self {
        let mut u = Self::empty(cmds.iter().map(|c| Self::size(c)).sum());
        for c in cmds {
            u.push(c);
        }
        u.keep = cmds.len();
        u
    }

    /// Adds `WAIT replicas timeout`: the answer becomes an array of the unit's answer, then
    /// the number of replicas that acknowledged.
    pub(crate) fn and_wait(mut self, replicas: u32, timeout_ms: u64) -> Self {
        let (mut r, mut t) = (itoa::Buffer::new(), itoa::Buffer::new());
        self.push(&[
            b"WAIT",
            r.format(replicas).as_bytes(),
            t.format(timeout_ms).as_bytes(),
        ]);
        self.keep += 1;
        self
    }
}

struct Job {
    unit: Unit,
    reply: oneshot::Sender<RedisResult<Value>>,
}

/// What the reader must answer, in the order written: the caller, the unit's reply count, and
/// how many of its last replies make the answer.
struct Waiting {
    reply: oneshot::Sender<RedisResult<Value>>,
    replies: usize,
    keep: usize,
}

/// The caller's side of the connection: cheap to clone; the pump ends when the last clone is
/// dropped.
#[derive(Clone)]
pub(crate) struct Link {
    tx: mpsc::UnboundedSender<Job>,
}

fn io_error(what: &'static str) -> RedisError {
    RedisError::from((ErrorKind::Io, what))
}

/// The answer of a unit that may have been written, on a connection lost before its reply: its
/// outcome is unknown, as after a timeout (the service gives a claim back then).
fn outcome_unknown() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "connection to Redis lost before the answer",
    ))
}

impl Link {
    /// Starts the pump on the current tokio runtime; it connects at the first call. `timeout`
    /// bounds a connect and a write; `reply_bound` how long a connection may answer nothing
    /// while commands wait.
    pub(crate) fn start(info: ConnectionInfo, timeout: Duration, reply_bound: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(pump(rx, info, timeout, reply_bound));
        Self { tx }
    }

    /// Queues `unit` and waits for its answer (a Redis error answered to it alone stays its
    /// own; a lost connection is every waiting caller's).
    pub(crate) async fn call(&self, unit: Unit) -> RedisResult<Value> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { unit, reply })
            .map_err(|_| io_error("the store's connection task has stopped"))?;
        rx.await.unwrap_or_else(|_| Err(outcome_unknown()))
    }
}

/// A live connection: its write half, and what its reader waits for.
struct Conn {
    write: Box<dyn AsyncWrite + Send + Unpin>,
    waiting: mpsc::UnboundedSender<Waiting>,
    /// Units written and not yet answered.
    in_flight: Arc<AtomicUsize>,
    dead: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Whatever it still waited for is answered "lost" (its senders drop with it).
        self.reader.abort();
    }
}

async fn pump(
    mut rx: mpsc::UnboundedReceiver<Job>,
    info: ConnectionInfo,
    timeout: Duration,
    reply_bound: Duration,
) {
    let mut conn: Option<Conn> = None;
    let mut retry_at: Option<Instant> = None;
    // Commands in the last write: whether callers are coming in company.
    let mut last = 0;
    let mut buf = Vec::new();
    while let Some(first) = rx.recv().await {
        // In company (commands in flight, or the last write held several), let every task that
        // is ready now queue its command behind this one. Alone (c = 1), the yield would only
        // cost a pass of the runtime's event loop: write at once.
        let in_flight = conn
            .as_ref()
            .map_or(0, |c| c.in_flight.load(Ordering::Acquire));
        if last > 1 || in_flight > 0 {
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
        if jobs.is_empty() {
            continue;
        }
        if conn
            .as_ref()
            .is_some_and(|c| c.dead.load(Ordering::Acquire) || c.reader.is_finished())
        {
            conn = None;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => {
                if retry_at.is_some_and(|t| Instant::now() < t) {
                    fail(jobs, &io_error("not connected to Redis (reconnecting)"));
                    continue;
                }
                match tokio::time::timeout(timeout, connect(&info)).await {
                    Ok(Ok((read, write))) => {
                        retry_at = None;
                        crate::telemetry::connection("opened");
                        let (waiting, queue) = mpsc::unbounded_channel();
                        let dead = Arc::new(AtomicBool::new(false));
                        let in_flight = Arc::new(AtomicUsize::new(0));
                        let reader = tokio::spawn(read_replies(
                            read,
                            queue,
                            in_flight.clone(),
                            dead.clone(),
                            reply_bound,
                        ));
                        conn.insert(Conn {
                            write,
                            waiting,
                            in_flight,
                            dead,
                            reader,
                        })
                    }
                    failed => {
                        let e = match failed {
                            Ok(Err(e)) => e,
                            _ => io_error("connecting to Redis timed out"),
                        };
                        crate::telemetry::connection("failed");
                        tracing::warn!(error = %e, "idempotency store: connecting to Redis failed");
                        retry_at = Some(Instant::now() + RECONNECT_PAUSE);
                        fail(jobs, &e);
                        continue;
                    }
                }
            }
        };
        buf.clear();
        let mut units = 0;
        for job in jobs {
            // Those who gave up while the connection was made are not written.
            if job.reply.is_closed() {
                continue;
            }
            if job.unit.replies == 0 {
                let _ = job.reply.send(Ok(Value::Array(Vec::new())));
                continue;
            }
            units += 1;
            buf.extend_from_slice(&job.unit.bytes);
            c.in_flight.fetch_add(1, Ordering::AcqRel);
            let _ = c.waiting.send(Waiting {
                reply: job.reply,
                replies: job.unit.replies,
                keep: job.unit.keep,
            });
        }
        if units == 0 {
            continue;
        }
        crate::telemetry::pipeline(units);
        // Bounded like a silent connection, longer than the callers' own timeout: a caller that
        // timed out gives its claim back on this connection, behind the claim.
        let written = tokio::time::timeout(reply_bound, c.write.write_all(&buf)).await;
        if !matches!(written, Ok(Ok(()))) {
            // Closing it answers everyone waiting on it; the next call reconnects.
            crate::telemetry::connection("lost");
            tracing::warn!(
                "idempotency store: a write to Redis failed or stalled; closing the connection"
            );
            conn = None;
        }
        if buf.capacity() > 64 * 1024 {
            buf = Vec::new();
        }
    }
}

fn fail(jobs: Vec<Job>, e: &RedisError) {
    for j in jobs {
        let _ = j.reply.send(Err(e.clone()));
    }
}

type Halves = (
    Box<dyn AsyncRead + Send + Unpin>,
    Box<dyn AsyncWrite + Send + Unpin>,
);

/// Opens the socket the URL names and authenticates and selects the database it asks for.
async fn connect(info: &ConnectionInfo) -> RedisResult<Halves> {
    let (mut read, mut write): Halves = match info.addr() {
        ConnectionAddr::Tcp(host, port) => {
            let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            // A claim or completion is one small write that someone waits for; Nagle would hold
            // it behind an unacknowledged one.
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        }
        #[cfg(unix)]
        ConnectionAddr::Unix(path) => {
            let (r, w) = tokio::net::UnixStream::connect(path).await?.into_split();
            (Box::new(r), Box::new(w))
        }
        _ => {
            return Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "the idempotency store connects over TCP or a Unix socket only",
            )))
        }
    };
    let settings = info.redis_settings();
    let mut hello: Vec<&[&[u8]]> = Vec::new();
    let auth_user;
    let auth_pass;
    let db;
    if let Some(password) = settings.password() {
        auth_pass = [&b"AUTH"[..], password.as_bytes()];
        match settings.username() {
            Some(user) => {
                auth_user = [&b"AUTH"[..], user.as_bytes(), password.as_bytes()];
                hello.push(&auth_user);
            }
            None => hello.push(&auth_pass),
        }
    }
    let number = settings.db().to_string();
    if settings.db() != 0 {
        db = [&b"SELECT"[..], number.as_bytes()];
        hello.push(&db);
    }
    if !hello.is_empty() {
        let unit = Unit::all(&hello);
        write.write_all(&unit.bytes).await?;
        let mut buf = BytesMut::with_capacity(256);
        let mut answered = 0;
        while answered < unit.replies {
            match parse(&buf, 0) {
                Ok(Some((v, used))) => {
                    buf.advance(used);
                    answered += 1;
                    if let Value::ServerError(e) = v {
                        return Err(e.into());
                    }
                }
                Ok(None) => {
                    if read.read_buf(&mut buf).await? == 0 {
                        return Err(io_error("Redis closed the connection while connecting"));
                    }
                }
                Err(()) => return Err(io_error("Redis answered something that is not RESP")),
            }
        }
    }
    Ok((read, write))
}

/// Reads replies and answers the callers in the order their commands were written. Ends (and
/// marks the connection dead) on end of stream, a read error, a reply that is not RESP, or no
/// reply for `reply_bound` while callers wait; whoever still waits is then answered "lost".
async fn read_replies(
    mut read: Box<dyn AsyncRead + Send + Unpin>,
    mut queue: mpsc::UnboundedReceiver<Waiting>,
    in_flight: Arc<AtomicUsize>,
    dead: Arc<AtomicBool>,
    reply_bound: Duration,
) {
    // Marks the connection dead however the reader ends (a panic included).
    struct Dead(Arc<AtomicBool>);
    impl Drop for Dead {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let _dead = Dead(dead);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut kept: Vec<Value> = Vec::new();
    // The first error among the unit's replies that are not kept: a command `MULTI` refused
    // (`ERR unknown command`, `LOADING`, `OOM`). It stands in for the error that `EXEC` then
    // answers (`EXECABORT`, `EXEC without MULTI`), which does not say why.
    let mut refused: Option<Value> = None;
    // Replies already read of the unit at the front.
    let mut read_of_front = 0;
    'conn: loop {
        loop {
            while let Ok(w) = queue.try_recv() {
                waiting.push_back(w);
            }
            // Whether the next reply is part of its caller's answer (a reply nobody asked for
            // is read whole, then ends the connection).
            let keep = waiting
                .front()
                .is_none_or(|front| read_of_front + 1 + front.keep > front.replies);
            match reply(&buf, 0, keep) {
                Ok(Some((v, used))) => {
                    buf.advance(used);
                    let Some(front) = waiting.front() else {
                        tracing::warn!("idempotency store: Redis sent a reply nobody asked for");
                        break 'conn;
                    };
                    read_of_front += 1;
                    if keep {
                        kept.push(v);
                    } else if matches!(v, Value::ServerError(_)) && refused.is_none() {
                        refused = Some(v);
                    }
                    if read_of_front == front.replies {
                        let Some(w) = waiting.pop_front() else {
                            break 'conn;
                        };
                        read_of_front = 0;
                        in_flight.fetch_sub(1, Ordering::AcqRel);
                        if let Some(first) = refused.take() {
                            if let Some(slot) =
                                kept.iter_mut().find(|v| matches!(v, Value::ServerError(_)))
                            {
                                *slot = first;
                            }
                        }
                        let answer = if w.keep == 1 {
                            kept.pop().unwrap_or(Value::Nil)
                        } else {
                            Value::Array(std::mem::take(&mut kept))
                        };
                        kept.clear();
                        let _ = w.reply.send(match answer {
                            Value::ServerError(e) => Err(e.into()),
                            v => Ok(v),
                        });
                    }
                }
                Ok(None) => break,
                Err(()) => {
                    tracing::warn!("idempotency store: Redis answered something that is not RESP");
                    break 'conn;
                }
            }
        }
        while let Ok(w) = queue.try_recv() {
            waiting.push_back(w);
        }
        let got = if waiting.is_empty() {
            // Nothing asked: wait for a question or for the socket (closed by Redis, say).
            tokio::select! {
                w = queue.recv() => match w {
                    Some(w) => { waiting.push_back(w); continue 'conn; }
                    None => break 'conn,
                },
                r = read.read_buf(&mut buf) => r,
            }
        } else {
            match tokio::time::timeout(reply_bound, read.read_buf(&mut buf)).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(
                        waiting = waiting.len(),
                        "idempotency store: no reply from Redis within {reply_bound:?}; closing the connection"
                    );
                    break 'conn;
                }
            }
        };
        match got {
            Ok(0) | Err(_) => break 'conn,
            Ok(_) => {}
        }
    }
    // Not reached when the pump closes the connection itself (it aborts this task).
    crate::telemetry::connection("lost");
    // The senders in `waiting` and `queue` drop here: their callers hear "lost".
}

/// The position of the `\r\n` that ends the line at the start of `buf`: `Ok(None)` while it is
/// not all there, `Err` for a `\r` not followed by `\n` or a line longer than [`MAX_LINE`].
fn line_end(buf: &[u8]) -> Result<Option<usize>, ()> {
    let head = &buf[..buf.len().min(MAX_LINE)];
    match head.iter().position(|&b| b == b'\r') {
        Some(i) => match buf.get(i + 1) {
            Some(b'\n') => Ok(Some(i)),
            Some(_) => Err(()),
            None => Ok(None),
        },
        None if buf.len() >= MAX_LINE => Err(()),
        None => Ok(None),
    }
}

/// A length: -1 (nil), or 0 up to `max`.
fn length(line: &[u8], max: usize) -> Result<Option<usize>, ()> {
    match integer(line)? {
        -1 => Ok(None),
        n => usize::try_from(n)
            .ok()
            .filter(|n| *n <= max)
            .map(Some)
            .ok_or(()),
    }
}

/// An integer line: an optional `-`, then ASCII digits whose value fits an `i64`.
fn integer(line: &[u8]) -> Result<i64, ()> {
    let (negative, digits) = match line {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, line),
    };
    if digits.is_empty() {
        return Err(());
    }
    // Accumulated on the side of its sign, so that `i64::MIN` reads too.
    digits.iter().try_fold(0i64, |n, &c| {
        if !c.is_ascii_digit() {
            return Err(());
        }
        let d = i64::from(c - b'0');
        let n = n.checked_mul(10).ok_or(())?;
        if negative {
            n.checked_sub(d).ok_or(())
        } else {
            n.checked_add(d).ok_or(())
        }
    })
}

/// One RESP2 reply from the start of `buf`: the value and the bytes it took, `None` when `buf`
/// does not hold all of it yet, `Err` when it is not RESP.
fn parse(buf: &[u8], depth: usize) -> Result<Option<(Value, usize)>, ()> {
    reply(buf, depth, true)
}

/// [`parse`], or with `keep` false, a reply read and checked as strictly but not built: `Nil`
/// stands for it, unless it is an error (so a reply nobody reads costs no allocation).
fn reply(buf: &[u8], depth: usize, keep: bool) -> Result<Option<(Value, usize)>, ()> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let Some(end) = line_end(buf)? else {
        return Ok(None);
    };
    // A type byte, then the line: `\r\n` at once is not RESP.
    let line = buf.get(1..end).ok_or(())?;
    let next = end + 2;
    let v = match kind {
        b'+' if !keep => Value::Nil,
        b'+' if line == b"OK" => Value::Okay,
        b'+' => Value::SimpleString(String::from_utf8_lossy(line).into_owned()),
        // Rare (NOSCRIPT, WRONGTYPE, ...): redis-rs makes its typed error.
        b'-' => redis::parse_redis_value(&buf[..next]).map_err(|_| ())?,
        b':' => match integer(line)? {
            n if keep => Value::Int(n),
            _ => Value::Nil,
        },
        b'$' => {
            let Some(n) = length(line, MAX_BULK)? else {
                return Ok(Some((Value::Nil, next)));
            };
            let Some(data) = buf.get(next..next + n) else {
                return Ok(None);
            };
            match buf.get(next + n..next + n + 2) {
                None | Some(b"\r") => return Ok(None),
                Some(b"\r\n") if !keep => return Ok(Some((Value::Nil, next + n + 2))),
                Some(b"\r\n") => return Ok(Some((Value::BulkString(data.to_vec()), next + n + 2))),
                Some(_) => return Err(()),
            }
        }
        b'*' => {
            let Some(n) = length(line, MAX_ITEMS)? else {
                return Ok(Some((Value::Nil, next)));
            };
            if depth >= MAX_DEPTH {
                return Err(());
            }
            let mut items = Vec::with_capacity(if keep { n.min(16) } else { 0 });
            let mut at = next;
            for _ in 0..n {
                match reply(&buf[at..], depth + 1, keep)? {
                    Some((v, used)) => {
                        if keep {
                            items.push(v);
                        }
                        at += used;
                    }
                    None => return Ok(None),
                }
            }
            return Ok(Some((
                if keep {
                    Value::Array(items)
                } else {
                    Value::Nil
                },
                at,
            )));
        }
        _ => return Err(()),
    };
    Ok(Some((v, next)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::AsyncWriteExt;

    fn whole(bytes: &[u8]) -> Value {
        match parse(bytes, 0) {
            Ok(Some((v, used))) => {
                assert_eq!(used, bytes.len());
                v
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn integers_take_a_sign_and_digits_that_fit() {
        for (line, n) in [
            (&b"0"[..], 0),
            (b"-0", 0),
            (b"0042", 42),
            (b"00000000000000000000000001", 1),
            (b"9223372036854775807", i64::MAX),
            (b"-9223372036854775808", i64::MIN),
        ] {
            assert_eq!(integer(line), Ok(n));
        }
        for line in [
            &b""[..],
            b"-",
            b"+1",
            b"--1",
            b" 1",
            b"1 ",
            b"1x",
            b"9223372036854775808",
            b"-9223372036854775809",
        ] {
            assert_eq!(integer(line), Err(()), "{line:?}");
        }
    }

    #[test]
    fn replies_of_every_kind_are_read() {
        assert_eq!(whole(b"+OK\r\n"), Value::Okay);
        assert_eq!(whole(b"+QUEUED\r\n"), Value::SimpleString("QUEUED".into()));
        assert_eq!(whole(b":-12\r\n"), Value::Int(-12));
        assert_eq!(whole(b"$-1\r\n"), Value::Nil);
        assert_eq!(whole(b"*-1\r\n"), Value::Nil);
        assert_eq!(whole(b"$0\r\n\r\n"), Value::BulkString(vec![]));
        assert_eq!(
            whole(b"$4\r\na\r\nb\r\n"),
            Value::BulkString(b"a\r\nb".to_vec())
        );
        assert_eq!(
            whole(b"*2\r\n$-1\r\n*2\r\n$10\r\n1700000000\r\n$3\r\n123\r\n"),
            Value::Array(vec![
                Value::Nil,
                Value::Array(vec![
                    Value::BulkString(b"1700000000".to_vec()),
                    Value::BulkString(b"123".to_vec()),
                ])
            ])
        );
        let e = match whole(b"-NOSCRIPT No matching script\r\n") {
            Value::ServerError(e) => RedisError::from(e),
            other => panic!("{other:?}"),
        };
        assert_eq!(e.code(), Some("NOSCRIPT"));
        // Incomplete, and not RESP.
        for part in [
            &b""[..],
            b"$5\r\nab",
            b"$2\r\nab\r",
            b"*2\r\n:1\r\n",
            b":12",
        ] {
            assert_eq!(parse(part, 0), Ok(None), "{part:?}");
        }
        for bad in [
            &b"?x\r\n"[..],
            b":x\r\n",
            b"$2\r\nabcd\r\n",
            b"\r\n",
            b"$-5\r\n",
            b"*-7\r\n",
            b"$1\rx",
            b"$536870913\r\n",
        ] {
            assert_eq!(parse(bad, 0), Err(()), "{bad:?}");
        }
        let deep = b"*1\r\n".repeat(MAX_DEPTH + 1);
        assert_eq!(parse(&deep, 0), Err(()));
        // An array longer than any reply of the store's is refused at its header.
        assert_eq!(
            parse(format!("*{}\r\n", MAX_ITEMS + 1).as_bytes(), 0),
            Err(())
        );
        assert_eq!(parse(b"*536870912\r\n:1\r\n", 0), Err(()));
        let most = format!("*{MAX_ITEMS}\r\n{}", ":1\r\n".repeat(MAX_ITEMS));
        assert!(
            matches!(parse(most.as_bytes(), 0), Ok(Some((Value::Array(a), _))) if a.len() == MAX_ITEMS)
        );
        // A line that never ends is not waited for without bound.
        assert_eq!(parse(&[b'+'; MAX_LINE], 0), Err(()));
        assert_eq!(parse(&[b'+'; MAX_LINE - 1], 0), Ok(None));
    }

    /// A reader on one end of an in-memory pipe, and what the test does with the other end.
    struct Fake {
        server: tokio::io::DuplexStream,
        queue: mpsc::UnboundedSender<Waiting>,
        in_flight: Arc<AtomicUsize>,
        dead: Arc<AtomicBool>,
        reader: tokio::task::JoinHandle<()>,
    }

    fn fake(reply_bound: Duration) -> Fake {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (queue, rx) = mpsc::unbounded_channel();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let dead = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(read_replies(
            Box::new(client),
            rx,
            in_flight.clone(),
            dead.clone(),
            reply_bound,
        ));
        Fake {
            server,
            queue,
            in_flight,
            dead,
            reader,
        }
    }

    impl Fake {
        fn expect(&self, unit: &Unit) -> oneshot::Receiver<RedisResult<Value>> {
            let (reply, rx) = oneshot::channel();
            self.in_flight.fetch_add(1, Ordering::AcqRel);
            self.queue
                .send(Waiting {
                    reply,
                    replies: unit.replies,
                    keep: unit.keep,
                })
                .unwrap();
            rx
        }
    }

    /// A command that `MULTI` refused to queue: the transaction's answer is that command's
    /// error, not `EXEC`'s (`EXECABORT`, or `EXEC without MULTI` when `MULTI` itself was
    /// refused), which does not say why; and the next unit still gets its own reply.
    #[tokio::test]
    async fn a_refused_command_in_a_transaction_answers_with_its_own_error() {
        let mut f = fake(Duration::from_secs(5));
        let claim = f.expect(&Unit::transaction(&[&[b"SET"], &[b"NOPE"]]));
        let loading = f.expect(&Unit::transaction(&[&[b"SET"]]).and_wait(1, 10));
        let next = f.expect(&Unit::one(&[b"GET", b"k"]));
        f.server
            .write_all(b"+OK\r\n+QUEUED\r\n-ERR unknown command 'NOPE'\r\n-EXECABORT Transaction discarded because of previous errors.\r\n")
            .await
            .unwrap();
        f.server
            .write_all(b"-LOADING Redis is loading the dataset in memory\r\n-LOADING Redis is loading the dataset in memory\r\n-ERR EXEC without MULTI\r\n:0\r\n$1\r\nv\r\n")
            .await
            .unwrap();
        let err = claim.await.unwrap().unwrap_err();
        assert_eq!(err.code(), Some("ERR"), "{err:?}");
        assert!(err.to_string().contains("unknown command"), "{err}");
        // With WAIT the answer is an array: the transaction's error in it is replaced too.
        match loading.await.unwrap().unwrap() {
            Value::Array(items) => match items.as_slice() {
                [Value::ServerError(e), Value::Int(0)] => assert_eq!(e.code(), "LOADING"),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        assert_eq!(
            next.await.unwrap().unwrap(),
            Value::BulkString(b"v".to_vec())
        );
        assert_eq!(f.in_flight.load(Ordering::Acquire), 0);
        assert!(!f.dead.load(Ordering::Acquire));
        assert!(!f.reader.is_finished());
    }

    #[tokio::test]
    async fn replies_answer_units_in_order_across_reads() {
        let mut f = fake(Duration::from_secs(5));
        let one = f.expect(&Unit::one(&[b"GET", b"k"]));
        let claim = f.expect(&Unit::transaction(&[&[b"SET"], &[b"PTTL"], &[b"TIME"]]));
        let waited = f.expect(&Unit::one(&[b"EVALSHA"]).and_wait(1, 10));
        let loads = f.expect(&Unit::all(&[&[b"A"], &[b"B"]]));
        let bytes: &[u8] = b"$1\r\nv\r\n+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n*3\r\n$-1\r\n:-2\r\n*2\r\n$1\r\n1\r\n$1\r\n2\r\n-NOSCRIPT gone\r\n:0\r\n$1\r\na\r\n$1\r\nb\r\n";
        // Byte by byte: every reply spans reads.
        for b in bytes {
            f.server.write_all(&[*b]).await.unwrap();
            tokio::task::yield_now().await;
        }
        assert_eq!(
            one.await.unwrap().unwrap(),
            Value::BulkString(b"v".to_vec())
        );
        assert_eq!(
            claim.await.unwrap().unwrap(),
            Value::Array(vec![
                Value::Nil,
                Value::Int(-2),
                Value::Array(vec![
                    Value::BulkString(b"1".to_vec()),
                    Value::BulkString(b"2".to_vec())
                ])
            ])
        );
        match waited.await.unwrap().unwrap() {
            Value::Array(both) => {
                assert!(matches!(both[0], Value::ServerError(_)));
                assert_eq!(both[1], Value::Int(0));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            loads.await.unwrap().unwrap(),
            Value::Array(vec![
                Value::BulkString(b"a".to_vec()),
                Value::BulkString(b"b".to_vec())
            ])
        );
        assert_eq!(f.in_flight.load(Ordering::Acquire), 0);
        assert!(!f.dead.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn a_reply_nobody_asked_for_ends_the_connection() {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _local = metrics::set_default_local_recorder(&recorder);
        let mut f = fake(Duration::from_secs(5));
        f.server.write_all(b"+OK\r\n").await.unwrap();
        (&mut f.reader).await.unwrap();
        assert!(f.dead.load(Ordering::Acquire));
        // Nothing more is taken: what the pump queues then is dropped, its caller answered
        // "outcome unknown" (as after a timeout) by `Link::call`.
        assert!(f.queue.is_closed());
        assert!(outcome_unknown().is_timeout());
        // Counted, on this (current-thread) runtime's thread.
        let lost: Vec<_> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, ..)| k.key().name() == crate::telemetry::STORE_CONNECTIONS_TOTAL)
            .map(|(k, _, _, v)| {
                (
                    k.key()
                        .labels()
                        .map(|l| l.value().to_owned())
                        .collect::<Vec<_>>(),
                    v,
                )
            })
            .collect();
        assert_eq!(
            lost,
            vec![(
                vec!["lost".to_owned()],
                metrics_util::debugging::DebugValue::Counter(1)
            )]
        );
    }

    #[tokio::test]
    async fn bytes_that_are_not_resp_end_the_connection_and_answer_lost() {
        let mut f = fake(Duration::from_secs(5));
        let waiting = f.expect(&Unit::one(&[b"GET", b"k"]));
        f.server.write_all(b"\r\n").await.unwrap();
        (&mut f.reader).await.unwrap();
        assert!(f.dead.load(Ordering::Acquire));
        assert!(waiting.await.is_err(), "answered lost (its sender dropped)");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_after_the_reply_bound() {
        let mut f = fake(Duration::from_millis(500));
        let waiting = f.expect(&Unit::one(&[b"GET", b"k"]));
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!f.dead.load(Ordering::Acquire));
        tokio::time::sleep(Duration::from_millis(200)).await;
        (&mut f.reader).await.unwrap();
        assert!(f.dead.load(Ordering::Acquire));
        assert!(waiting.await.is_err());
        // Idle (nothing asked), it stays open however long.
        let idle = fake(Duration::from_millis(500));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!idle.dead.load(Ordering::Acquire));
        drop(idle.server);
    }

    #[test]
    fn units_are_encoded_as_resp_commands() {
        let u = Unit::one(&[b"GET", b"k"]);
        assert_eq!(u.bytes, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        assert_eq!((u.replies, u.keep), (1, 1));
        let u = Unit::transaction(&[&[b"TIME"]]).and_wait(1, 50);
        assert_eq!(
            u.bytes,
            b"*1\r\n$5\r\nMULTI\r\n*1\r\n$4\r\nTIME\r\n*1\r\n$4\r\nEXEC\r\n*3\r\n$4\r\nWAIT\r\n$1\r\n1\r\n$2\r\n50\r\n"
        );
        assert_eq!((u.replies, u.keep), (4, 2));
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Nil),
            Just(Value::Okay),
            any::<i64>().prop_map(Value::Int),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::BulkString),
            // An error reply, as redis-rs reads one (a code, then details).
            "[A-Z]{1,10}( [a-z0-9]{1,8}){0,3}".prop_map(|line| {
                redis::parse_redis_value(format!("-{line}\r\n").as_bytes()).unwrap()
            }),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            proptest::collection::vec(inner, 0..4).prop_map(Value::Array)
        })
    }

    fn encode(v: &Value, out: &mut Vec<u8>) {
        match v {
            Value::Nil => out.extend_from_slice(b"$-1\r\n"),
            Value::Okay => out.extend_from_slice(b"+OK\r\n"),
            Value::Int(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
            Value::BulkString(b) => {
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Value::Array(items) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for i in items {
                    encode(i, out);
                }
            }
            Value::ServerError(e) => {
                out.push(b'-');
                out.extend_from_slice(e.code().as_bytes());
                if let Some(d) = e.details() {
                    out.push(b' ');
                    out.extend_from_slice(d.as_bytes());
                }
                out.extend_from_slice(b"\r\n");
            }
            _ => unreachable!(),
        }
    }

    proptest! {
        /// Any reply reads back as itself, whole, and every shorter prefix of it reads as
        /// "not all there yet".
        #[test]
        fn replies_round_trip(v in value()) {
            let mut bytes = Vec::new();
            encode(&v, &mut bytes);
            prop_assert_eq!(parse(&bytes, 0), Ok(Some((v.clone(), bytes.len()))));
            // Read without being kept: as many bytes, and only an error is built.
            let skipped = if matches!(v, Value::ServerError(_)) { v } else { Value::Nil };
            prop_assert_eq!(reply(&bytes, 0, false), Ok(Some((skipped, bytes.len()))));
            for cut in 0..bytes.len() {
                prop_assert_eq!(parse(&bytes[..cut], 0), Ok(None));
                prop_assert_eq!(reply(&bytes[..cut], 0, false), Ok(None));
            }
        }

        /// An integer line reads as the standard library reads it (which also takes a `+`,
        /// which RESP never sends), and every `i64` reads back as itself.
        #[test]
        fn integers_read_as_the_standard_library_reads_them(
            line in proptest::collection::vec(
                prop_oneof![
                    8 => proptest::sample::select(&b"0123456789"[..]),
                    1 => proptest::sample::select(&b"-+ x"[..]),
                ],
                0..22,
            ),
            n in any::<i64>(),
        ) {
            let std = std::str::from_utf8(&line).ok().and_then(|l| l.parse::<i64>().ok());
            match integer(&line) {
                Ok(v) => prop_assert_eq!(Some(v), std),
                Err(()) => prop_assert!(std.is_none() || line.first() == Some(&b'+')),
            }
            prop_assert_eq!(integer(n.to_string().as_bytes()), Ok(n));
        }

        /// Arbitrary bytes never panic the reader, and it never claims more than it was given;
        /// drawn mostly from RESP's own bytes, so that they come near replies.
        #[test]
        fn any_bytes_are_read_without_panic(bytes in proptest::collection::vec(
            prop_oneof![
                4 => proptest::sample::select(&b"+-:$*\r\n0123456789-1OK"[..]),
                1 => any::<u8>(),
            ],
            0..64,
        )) {
            let read = parse(&bytes, 0);
            if let Ok(Some((_, used))) = read {
                prop_assert!(used <= bytes.len());
            }
            // Skipping accepts and rejects exactly what reading does.
            prop_assert_eq!(
                reply(&bytes, 0, false).map(|r| r.map(|(_, used)| used)),
                read.map(|r| r.map(|(_, used)| used))
            );
        }
    }
}
