//! The agent's one loop: everything it reacts to (the stop signal, a
//! command, the attempt in flight, the live session and its renewal, the
//! end of a wait) merged into one [`Event`] and handled in one `match`,
//! against the [`Stage`] it is in: waiting for a credential, connecting,
//! serving, or backing off (jittered, reset once a session proved
//! healthy).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use link::End;

use crate::backoff::Backoff;
use crate::connect::{self, ConnectError, Connected};
use crate::renew;
use crate::session::{DRAIN_DEADLINE, Session, SessionEnd, SessionParams};
use crate::state::{AgentError, Phase, describe};
use crate::supervisor::{Command, SessionRenew, Shared};

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the loop is doing.
enum Stage {
    /// Nothing to do until a command: not enrolled, or the relay revoked
    /// the credential.
    Waiting,
    /// Dialling the relay.
    Connecting(Boxed<Result<Connected, ConnectError>>),
    /// A session runs; `renewing` until the renewal task is done.
    Serving {
        session: Arc<Session>,
        run: Boxed<SessionEnd>,
        renewing: Option<Boxed<()>>,
        started: Instant,
    },
    /// Waiting before the next attempt.
    BackingOff(Pin<Box<tokio::time::Sleep>>),
}

/// Everything the loop reacts to.
enum Event {
    /// The agent is told to stop (not while serving: the session drains).
    Stop,
    Command(Command),
    /// The attempt in flight ended (the socket boxed: the event is small).
    Attempt(Result<Box<Connected>, ConnectError>),
    /// The live session ended.
    Ended(SessionEnd),
    /// The session's renewal task is done (it renews no more).
    Renewed,
    /// The wait before the next attempt is over.
    Waited,
}

impl Stage {
    /// The next event of this stage's own (pends forever while waiting).
    async fn next(&mut self) -> Event {
        match self {
            Stage::Waiting => std::future::pending().await,
            Stage::Connecting(attempt) => Event::Attempt(attempt.await.map(Box::new)),
            Stage::Serving { run, renewing, .. } => {
                let renewed = async {
                    match renewing {
                        Some(task) => task.await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    end = run.as_mut() => Event::Ended(end),
                    () = renewed => Event::Renewed,
                }
            }
            Stage::BackingOff(sleep) => {
                sleep.as_mut().await;
                Event::Waited
            }
        }
    }
}

/// What to do after an attempt or a session.
enum After {
    /// Dial again now.
    Now,
    /// Dial again after this long.
    Wait(Duration),
    /// Not until a new credential comes.
    NewCredential,
    /// The agent stopped.
    Stop,
}

/// Runs the loop until `shutdown` or [`Command::Shutdown`], then waits
/// (bounded) for the streams still running.
pub(crate) async fn run(
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
) {
    let mut commands = Commands(Some(commands));
    let stop = shutdown.child_token();
    tokio::spawn(crate::supervisor::watch_service(shared.clone(), stop.clone()));
    let tasks = TaskTracker::new();
    let mut backoff = Backoff::new(Duration::from_secs(1), shared.config.reconnect_max_delay);
    let mut stage = begin(&shared, &stop);
    loop {
        let serving = matches!(stage, Stage::Serving { .. });
        let event = tokio::select! {
            _ = stop.cancelled(), if !serving => Event::Stop,
            cmd = commands.next() => Event::Command(cmd),
            event = stage.next() => event,
        };
        let after = match event {
            Event::Stop => After::Stop,
            Event::Command(cmd) => match (handle(&shared, cmd, &stop), &stage) {
                // A new token or a reconnect while serving: the session
                // ends once its streams finished (then the loop dials).
                (Next::Retry, Stage::Serving { session, .. }) => {
                    session.reconnect();
                    continue;
                }
                // The session sees the stop itself and drains.
                (Next::Stop | Next::Stay, Stage::Serving { .. }) | (Next::Stay, _) => continue,
                (Next::Retry, _) => After::Now,
                (Next::Stop, _) => After::Stop,
            },
            Event::Attempt(Ok(conn)) => {
                stage = serve(&shared, *conn, &tasks, &stop);
                continue;
            }
            Event::Attempt(Err(e)) => refused(&shared, e, &mut backoff),
            Event::Renewed => {
                if let Stage::Serving { renewing, .. } = &mut stage {
                    *renewing = None;
                }
                continue;
            }
            Event::Ended(end) => {
                let Stage::Serving { started, .. } = &stage else { continue };
                shared.set_current(None);
                if started.elapsed() >= shared.config.healthy_after {
                    backoff.reset();
                }
                ended(&shared, end, &mut backoff)
            }
            Event::Waited => After::Now,
        };
        stage = match after {
            After::Stop => break,
            After::Now => begin(&shared, &stop),
            After::NewCredential => {
                shared.set_phase(Phase::Revoked);
                Stage::Waiting
            }
            After::Wait(delay) => {
                shared.set_phase(Phase::BackingOff { until: SystemTime::now() + delay });
                Stage::BackingOff(Box::pin(tokio::time::sleep(delay)))
            }
        };
    }
    shared.set_phase(Phase::Stopped);
    // Probes queued now are answered by the stopped phase.
    drop(commands);
    tasks.close();
    let _ = tokio::time::timeout(DRAIN_DEADLINE, tasks.wait()).await;
    info!("agent stopped");
}

/// The first step towards a session: dial, or wait to be enrolled.
fn begin(shared: &Arc<Shared>, stop: &CancellationToken) -> Stage {
    let token = shared.token();
    let Some(target) = shared.target().filter(|_| !token.is_empty()) else {
        // First run: stay up, say so, wait to be enrolled.
        shared.set_phase(Phase::NotEnrolled);
        info!("not enrolled: waiting for `tunnelctl enroll wss://RELAY` (the credential on stdin)");
        return Stage::Waiting;
    };
    if stop.is_cancelled() {
        return Stage::Waiting;
    }
    shared.set_phase(Phase::Connecting);
    let shared = shared.clone();
    Stage::Connecting(Box::pin(
        async move { connect::connect(&shared.config, &target, &token).await },
    ))
}

/// A session on `conn`: published, reported to, renewed and run.
fn serve(
    shared: &Arc<Shared>,
    conn: Connected,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Stage {
    let config = &shared.config;
    *shared.relay_pin.lock().unwrap_or_else(PoisonError::into_inner) = conn.relay_pin.clone();
    let (session, rx) = Session::new(SessionParams {
        id: conn.session_id.clone(),
        peer: conn.relay_limits,
        local: config.limits,
        gauge: shared.gauge.clone(),
        liveness: config.liveness,
        acks: conn.relay_acks,
        service_reports: conn.relay_service,
        upstream: shared.upstream.clone(),
        tasks: tasks.clone(),
        renewal: renew::Renewal::new(conn.relay_auth, conn.expires, conn.access_token.is_some()),
    });
    let host = shared.target().map(|t| t.host().to_owned()).unwrap_or_default();
    info!(session = %session.id, relay = %host, "connected to the relay {host} (session {})", session.id);
    shared.state.send_modify(|s| {
        s.phase = Phase::Connected { session_id: session.id.clone(), since: SystemTime::now() };
        s.sessions += 1;
        s.last_error = None;
    });
    shared.set_current(Some(session.clone()));
    shared.report_service();
    let renewing = SessionRenew { shared: shared.clone(), session: session.clone() };
    let keeper = renew::keep_authorized(Arc::new(renewing), session.id.clone());
    let run = session.clone().run(conn.socket, rx, stop.clone());
    Stage::Serving {
        session,
        run: Box::pin(run),
        renewing: Some(Box::pin(keeper)),
        started: Instant::now(),
    }
}

/// What follows a session's end.
fn ended(shared: &Shared, end: SessionEnd, backoff: &mut Backoff) -> After {
    match end {
        SessionEnd::Shutdown => After::Stop,
        SessionEnd::Reconnect => After::Now,
        // A drain is not a failure: come back when asked, spread a little
        // so a relay's agents do not return in one instant.
        SessionEnd::Goaway(retry) => {
            After::Wait(retry + retry.mul_f64(rand::random::<f64>() * 0.5))
        }
        SessionEnd::Lost(End::PeerClosed(Some((code, _))))
            if code == tunnel_proto::CLOSE_REVOKED =>
        {
            after_revocation(shared)
        }
        SessionEnd::Lost(end) => {
            let why = describe(&end);
            warn!(reason = %why, "relay session lost: {why}; reconnecting");
            shared.state.send_modify(|s| s.last_error = Some(AgentError::SessionLost(why)));
            After::Wait(backoff.next_delay())
        }
    }
}

/// What follows an attempt the relay (or the network) refused.
fn refused(shared: &Shared, e: ConnectError, backoff: &mut Backoff) -> After {
    let delay = match &e {
        ConnectError::Revoked => return after_revocation(shared),
        // The token file holds a newer token (an identity provider's
        // tooling renewed an expired JWT): use it.
        ConnectError::Unauthorized(_) if shared.adopt_fresh_file_token() => {
            info!("the relay refused the token; the token file holds a new one, trying it");
            return After::Now;
        }
        // The stored credential was refused (revoked?) and the configured
        // token differs: try that one at once.
        ConnectError::Unauthorized(_) if shared.fall_back() => {
            warn!(error = %e, "the relay refused the stored credential ({e}); trying the configured token");
            return After::Now;
        }
        // A refused credential or a pin mismatch will not fix itself
        // quickly: the longest wait, spread so agents refused together do
        // not return together.
        ConnectError::Unauthorized(_) | ConnectError::PinMismatch(_) => {
            let slow = backoff.ceiling().max(shared.config.reconnect_max_delay);
            slow.mul_f64(0.5 + rand::random::<f64>() * 0.5)
        }
        _ => backoff.next_delay(),
    };
    if let ConnectError::PinMismatch(m) = &e {
        *shared.relay_pin.lock().unwrap_or_else(PoisonError::into_inner) = Some(m.seen.clone());
    }
    let error = AgentError::from(e);
    let host = shared.target().map(|t| t.host().to_owned()).unwrap_or_default();
    warn!(
        error = %error,
        retry_in = ?delay,
        "cannot connect to {host}: {error}; retrying in {} s",
        delay.as_secs_f64().ceil() as u64
    );
    shared.state.send_modify(|s| s.last_error = Some(error));
    After::Wait(delay)
}

/// The relay revoked the credential in use: a newer token in the token
/// file, or the configured token behind a stored credential, is tried at
/// once; otherwise no attempt until a new credential comes.
fn after_revocation(shared: &Shared) -> After {
    if shared.adopt_fresh_file_token() {
        info!("the relay revoked the credential; the token file holds a new one, trying it");
        return After::Now;
    }
    if shared.fall_back() {
        warn!("the relay revoked the stored credential; trying the configured token");
        return After::Now;
    }
    let error = AgentError::Revoked;
    warn!(error = %error, "{error}");
    shared.state.send_modify(|s| s.last_error = Some(error));
    After::NewCredential
}

/// What the loop does after a command.
enum Next {
    /// Keep on.
    Stay,
    /// Connect now.
    Retry,
    /// Stop.
    Stop,
}

/// Applies a command; what the loop should do next.
fn handle(shared: &Shared, cmd: Command, stop: &CancellationToken) -> Next {
    match cmd {
        Command::Reconnect => {
            info!("reconnecting on request");
            Next::Retry
        }
        Command::ReplaceToken(token) => {
            info!("agent token replaced; used from the next connection");
            shared.set_token(token);
            if shared.current().is_some() { Next::Stay } else { Next::Retry }
        }
        Command::Shutdown => {
            stop.cancel();
            Next::Stop
        }
        Command::Probe(reply) => {
            let _ = reply.send(());
            Next::Stay
        }
    }
}

/// The command channel; once every sender is gone it pends forever
/// instead of answering `None` in a loop.
struct Commands(Option<mpsc::Receiver<Command>>);

impl Commands {
    async fn next(&mut self) -> Command {
        if let Some(rx) = &mut self.0 {
            if let Some(cmd) = rx.recv().await {
                return cmd;
            }
            self.0 = None;
        }
        std::future::pending().await
    }
}
