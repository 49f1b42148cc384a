//! Read-your-writes: waiting until a projection has passed a consistency token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_schemas::{ConsistencyToken, Position, TopicPartition, stream_type_of};
use keel_views::NOTIFY_CHANNEL;
use keel_views::positions::HeldBack;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tracing::warn;

use crate::error::ApiError;

/// Default wait for a token, and the most a client may ask for.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);
/// The longest `Keel-Consistency-Timeout` accepted.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// How often a query API on a hot standby looks whether the standby replayed more of the
/// primary's log.
const REPLAY_POLL: Duration = Duration::from_millis(5);

/// Bumps a counter each time the projector commits a batch (its `NOTIFY`), and once a
/// second regardless, so a lost notification delays a waiting query by a second at most.
/// On a hot standby, which cannot `LISTEN` (notifications are not replicated either), the
/// counter moves instead whenever the standby has replayed more of the primary's log,
/// looked at every [`REPLAY_POLL`]: a batch's checkpoint and rows arrive in one replayed
/// transaction, so a token is passed on the standby exactly when both are there.
pub fn spawn_listener(pool: PgPool) -> watch::Receiver<u64> {
    let (tx, rx) = watch::channel(0u64);
    tokio::spawn(async move {
        loop {
            if tx.is_closed() {
                return;
            }
            match sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()")
                .fetch_one(&pool)
                .await
            {
                Ok(true) => {
                    follow_replay(&pool, &tx).await;
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, "cannot reach the database; polling instead");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    tx.send_modify(|n| *n += 1);
                    continue;
                }
            }
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "cannot LISTEN; polling instead");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    tx.send_modify(|n| *n += 1);
                    continue;
                }
            };
            if listener.listen(NOTIFY_CHANNEL).await.is_err() {
                continue;
            }
            loop {
                match tokio::time::timeout(Duration::from_secs(1), listener.recv()).await {
                    Ok(Ok(_)) | Err(_) => tx.send_modify(|n| *n += 1),
                    Ok(Err(e)) => {
                        warn!(error = %e, "LISTEN connection lost; reconnecting");
                        break;
                    }
                }
                if tx.is_closed() {
                    return;
                }
            }
        }
    });
    rx
}

/// On a hot standby: bumps the counter each time the standby's replayed position moves,
/// until the database is no longer in recovery (promoted: it can `LISTEN` then) or cannot
/// be reached.
async fn follow_replay(pool: &PgPool, tx: &watch::Sender<u64>) {
    let mut last: Option<String> = None;
    loop {
        let read: Result<(bool, Option<String>), _> =
            sqlx::query_as("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text")
                .fetch_one(pool)
                .await;
        match read {
            Ok((true, lsn)) => {
                if lsn != last {
                    last = lsn;
                    tx.send_modify(|n| *n += 1);
                }
            }
            Ok((false, _)) => return,
            Err(e) => {
                warn!(error = %e, "reading the standby's replay position failed");
                tx.send_modify(|n| *n += 1);
                return;
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(REPLAY_POLL).await;
    }
}

/// Each projection's checkpoints as last read, with the notification count they were read
/// at: reused until the projector commits again, so a read without a token costs no
/// extra query. A cached position is never ahead of the view, so it is a correct lower
/// bound for `Keel-Projection-Position`.
#[derive(Clone, Debug, Default)]
pub struct CheckpointCache(Arc<Mutex<HashMap<String, (u64, Checkpoints)>>>);

/// Where a projection's live generation stands.
pub type Checkpoints = Arc<Positions>;

/// Where a projection's live generation stands: how far it has read each partition, and
/// what it holds back there.
#[derive(Debug, Default)]
pub struct Positions {
    /// Next offset per partition.
    pub next: HashMap<TopicPartition, i64>,
    /// The partitions where parked streams are held back.
    pub held: HashMap<TopicPartition, HeldBack>,
}

impl CheckpointCache {
    async fn read(
        &self,
        pool: &PgPool,
        projection: &str,
        seq: u64,
    ) -> Result<Checkpoints, ApiError> {
        if let Some((at, read)) = self
            .0
            .lock()
            .map_err(|_| ApiError::internal("reading the checkpoint cache", &"poisoned"))?
            .get(projection)
            && *at == seq
        {
            return Ok(Arc::clone(read));
        }
        // Read after the checkpoints: a stream parked at or before a checkpoint read was
        // parked in the same transaction that moved it, so it is seen here.
        let next = keel_views::positions::read(pool, projection).await?;
        let held = keel_views::positions::held_back(pool, projection).await?;
        let read = Arc::new(Positions { next, held });
        if let Ok(mut cache) = self.0.lock() {
            cache.insert(projection.to_owned(), (seq, Arc::clone(&read)));
        }
        Ok(read)
    }
}

/// The topics the projector reads and their partition counts, as last read, with the
/// notification count they were read at (refreshed once the projector commits again, at
/// least once a second).
#[derive(Clone, Debug, Default)]
pub struct TopicCache(Arc<Mutex<Option<(u64, Topics)>>>);

/// Partition count per topic.
pub type Topics = Arc<HashMap<String, i32>>;

impl TopicCache {
    async fn read(&self, pool: &PgPool, seq: u64) -> Result<Topics, ApiError> {
        if let Some((at, read)) = self
            .0
            .lock()
            .map_err(|_| ApiError::internal("reading the topic cache", &"poisoned"))?
            .as_ref()
            && *at == seq
        {
            return Ok(Arc::clone(read));
        }
        let read = Arc::new(keel_views::positions::topics(pool).await?);
        if let Ok(mut cache) = self.0.lock() {
            *cache = Some((seq, Arc::clone(&read)));
        }
        Ok(read)
    }
}

/// Refuses a token naming a topic the projector does not read (another deployment's topic
/// prefix, say) or a partition those topics do not have: no view could ever pass it, so
/// waiting for it would only end in a timeout. Before the projector has recorded its
/// topics, every token is let through (and waited for). A refusal is decided on a fresh
/// read, never on the cached one alone.
pub async fn check_token(
    pool: &PgPool,
    cache: &TopicCache,
    changes: &watch::Receiver<u64>,
    token: &ConsistencyToken,
) -> Result<(), ApiError> {
    let seq = *changes.borrow();
    if refusal(&*cache.read(pool, seq).await?, token).is_none() {
        return Ok(());
    }
    let fresh = keel_views::positions::topics(pool).await?;
    match refusal(&fresh, token) {
        None => Ok(()),
        Some(detail) => Err(ApiError::bad("Keel-Consistency-Token", detail)),
    }
}

/// Why no view reading `topics` could pass `token`, if none could.
fn refusal(topics: &HashMap<String, i32>, token: &ConsistencyToken) -> Option<String> {
    if topics.is_empty() {
        return None;
    }
    token.positions().find_map(|p| match topics.get(&p.topic) {
        None => {
            let mut known: Vec<&str> = topics.keys().map(String::as_str).collect();
            known.sort_unstable();
            Some(format!(
                "the token names topic {:?}, which this deployment does not have (it has {})",
                p.topic,
                known.join(", ")
            ))
        }
        Some(&partitions) if p.partition >= partitions => Some(format!(
            "the token names partition {} of {}, which has partitions 0 to {}",
            p.partition,
            p.topic,
            partitions - 1
        )),
        Some(_) => None,
    })
}

/// The positions a projection's view holds in full, as a token: the last offset read per
/// partition, or, where a parked stream holds records back, the offset before the first
/// of them (a client that sends the token back is then never refused for records the
/// view it read lacked).
pub fn position_token(read: &Positions) -> Option<String> {
    let mut token = ConsistencyToken::default();
    for (at, next) in &read.next {
        let whole = read
            .held
            .get(at)
            .map_or(*next, |held| held.first_offset.min(*next));
        if whole > 0 {
            token.include(Position {
                topic: at.topic.clone(),
                partition: at.partition,
                offset: whole - 1,
            });
        }
    }
    (!token.is_empty()).then(|| token.encode())
}

/// Waits until `projection` (reading `stream_types`) has passed every position of `token`
/// on its topics, woken by the projector's notifications; 503 when `wait` runs out.
/// Returns the projection's checkpoints as last read. A wait for a token is recorded in
/// the state's metrics, with its timeout if it runs out.
pub async fn wait_for(
    state: &crate::routes::AppState,
    projection: &str,
    stream_types: &[&str],
    token: Option<&ConsistencyToken>,
    wait: Duration,
) -> Result<Checkpoints, ApiError> {
    let (pool, cache, metrics) = (&state.pool, &state.checkpoints, &state.telemetry.queries);
    let mut changes = state.changes.clone();
    let started = tokio::time::Instant::now();
    let began = std::time::SystemTime::now();
    let deadline = started + wait;
    // The wait, as a span of the request's trace when traces are exported.
    let traced = |timed_out: bool| {
        use keel_telemetry::trace::{KeyValue, SpanKind, current_context, enabled, span_at};
        if !enabled() {
            return;
        }
        span_at(
            "consistency.wait",
            SpanKind::Internal,
            &current_context(),
            (began, std::time::SystemTime::now()),
            vec![
                KeyValue::new("keel.projection", projection.to_owned()),
                KeyValue::new("keel.timed_out", timed_out),
            ],
        );
    };
    loop {
        let seq = *changes.borrow_and_update();
        let read = cache.read(pool, projection, seq).await?;
        let passed = token.is_none_or(|token| {
            token.positions().all(|p| {
                let relevant = stream_type_of(&p.topic).is_some_and(|t| stream_types.contains(&t));
                !relevant
                    || read
                        .next
                        .get(&TopicPartition::new(p.topic.clone(), p.partition))
                        .is_some_and(|next| *next > p.offset)
            })
        });
        if passed {
            if token.is_some() {
                metrics.waited(projection, started.elapsed(), false);
                traced(false);
            }
            return Ok(read);
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => {
                metrics.waited(projection, started.elapsed(), true);
                traced(true);
                return Err(ApiError::Unavailable(format!(
                    "the {projection} view has not reached the consistency token within {} ms; retry",
                    wait.as_millis()
                )));
            }
        }
    }
}

/// Refuses to serve as current a view that lacks a record `token` names: once the view has
/// passed the token, a parked stream that holds back a record at or before one of the
/// token's positions (in `held`, the partitions `stream_types` are read from) answers 503
/// naming the stream. Returns how many parked streams the answer is served without.
pub async fn check_held_back(
    pool: &PgPool,
    read: &Positions,
    projection: &str,
    stream: Option<(&str, &str)>,
    token: Option<&ConsistencyToken>,
) -> Result<i64, ApiError> {
    if read.held.is_empty() {
        return Ok(0);
    }
    let covers = |at: &TopicPartition, first: i64| {
        token.is_some_and(|t| {
            t.positions()
                .any(|p| p.topic == at.topic && p.partition == at.partition && p.offset >= first)
        })
    };
    match stream {
        Some((stream_type, id)) => {
            match keel_views::positions::held_back_stream(pool, projection, stream_type, id).await?
            {
                None => Ok(0),
                Some((at, first)) if covers(&at, first) => Err(ApiError::HeldBack(format!(
                    "the {projection} view holds back stream {stream_type}/{id} from offset {first} of {}/{} on, \
                     which the consistency token covers: the stream is parked on a record the projection \
                     could not apply (see GET /v1/projections); it is not served as if current",
                    at.topic, at.partition
                ))),
                Some(_) => Ok(1),
            }
        }
        None => {
            if let Some((at, held)) = read.held.iter().find(|(at, h)| covers(at, h.first_offset)) {
                return Err(ApiError::HeldBack(format!(
                    "the {projection} view holds back {} parked stream(s) in {}/{} from offset {} on, which \
                     the consistency token covers: a stream is parked on a record the projection could not \
                     apply (see GET /v1/projections); the answer is not served as if current",
                    held.streams, at.topic, at.partition, held.first_offset
                )));
            }
            Ok(read.held.values().map(|h| h.streams).sum())
        }
    }
}
