//! What `projector status` and the query API's `/v1/projections` report: each projection's
//! live generation, state, checkpoints and rebuild, as PostgreSQL holds them. Where the
//! log ends is the broker's to say: the projector adds it with
//! [`ProjectionStatus::measure_lag`].

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use keel_schemas::TopicPartition;
use serde::Serialize;
use sqlx::PgPool;

/// One partition a projection reads.
#[derive(Clone, Debug, Serialize)]
pub struct PartitionStatus {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The next offset the projection will read.
    pub next_offset: i64,
    /// The partition's end, when asked of the broker.
    pub end_offset: Option<i64>,
    /// Records between the checkpoint and the end.
    pub lag: Option<i64>,
    /// How far behind the partition is in time: the age of the last record applied while
    /// records wait, 0 when none do.
    pub lag_seconds: Option<f64>,
    /// The log time of the last record applied.
    pub last_record_at: Option<DateTime<Utc>>,
    /// The projector process (`host:pid`) holding the partition, while its heartbeat holds.
    pub held_by: Option<String>,
    /// Records the gate skipped.
    pub rejected: i64,
    /// Streams of the partition the projection holds back (parked on a record it could
    /// not decode or apply).
    pub parked_streams: i64,
    /// The oldest of them, up to [`PARKED_LISTED`].
    pub parked: Vec<ParkedStream>,
}

/// Rows of a table a projector older than this code has not created (SQLSTATE 42P01) are
/// none.
fn missing_is_none<T>(rows: Result<Vec<T>, sqlx::Error>) -> Result<Vec<T>, sqlx::Error> {
    match rows {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Ok(Vec::new()),
        other => other,
    }
}

/// Parked streams listed per partition; `parked_streams` counts them all.
pub const PARKED_LISTED: i64 = 100;

/// A stream a projection holds back.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct ParkedStream {
    /// The projection.
    pub projection: String,
    /// The stream's type.
    pub stream_type: String,
    /// The stream's id.
    pub stream_id: String,
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The oldest record held back: a token naming this offset or a later one covers a
    /// record the view lacks.
    pub first_offset: i64,
    /// The newest record held back.
    pub last_offset: i64,
    /// Records held back.
    pub records: i32,
    /// The error the stream was parked on.
    pub error: String,
    /// When.
    pub parked_at: DateTime<Utc>,
}

/// The streams `projection`'s live generation holds back (all of them when `projection` is
/// `None`), oldest first per partition, at most `per_partition` of each partition.
pub async fn parked(
    pool: &PgPool,
    projection: Option<&str>,
    per_partition: i64,
) -> Result<Vec<ParkedStream>, sqlx::Error> {
    sqlx::query_as(
        "SELECT projection, stream_type, stream_id, topic, partition, first_offset, last_offset, records, error,
                parked_at
         FROM (SELECT s.*, row_number() OVER (PARTITION BY s.projection, s.topic, s.partition
                                              ORDER BY s.first_offset, s.stream_type, s.stream_id) AS n
               FROM keel_parked_streams s
               JOIN keel_projections p ON p.name = s.projection AND p.generation = s.generation
               WHERE $1::text IS NULL OR s.projection = $1) ranked
         WHERE n <= $2
         ORDER BY projection, topic, partition, first_offset, stream_type, stream_id",
    )
    .bind(projection)
    .bind(per_partition)
    .fetch_all(pool)
    .await
}

impl PartitionStatus {
    /// Sets the partition's end, and so its lag in records and in seconds.
    fn end_at(&mut self, end: Option<i64>) {
        self.end_offset = end;
        self.lag = end.map(|end| (end - self.next_offset).max(0));
        self.lag_seconds = match self.lag {
            Some(0) => Some(0.0),
            Some(_) => self
                .last_record_at
                .map(|at| ((Utc::now() - at).num_milliseconds().max(0) as f64) / 1000.0),
            None => None,
        };
    }
}

/// A rebuild in progress.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct RebuildStatus {
    /// The projection rebuilt.
    #[serde(skip)]
    pub projection: String,
    /// The generation being built.
    pub generation: i32,
    /// The code version it is built with.
    pub code_version: i32,
    /// `building`, or `stopped` on a dead letter.
    pub state: String,
    /// Why it stopped, if it did.
    pub error: Option<String>,
    /// Events applied to the new generation.
    pub events: i64,
    /// Records read, over every partition.
    pub records_done: i64,
    /// Records in the topics when last measured.
    pub records_total: i64,
    /// Events applied per second by the running rebuild.
    pub events_per_second: Option<f64>,
    /// Seconds left, estimated.
    pub eta_seconds: Option<f64>,
    /// Who runs it (`host:pid`).
    pub owner: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it last made progress.
    pub updated_at: DateTime<Utc>,
    /// How many running projector processes hold some of its partitions, filling them.
    #[sqlx(skip)]
    pub helpers: i64,
}

/// One projection.
#[derive(Clone, Debug, Serialize)]
pub struct ProjectionStatus {
    /// Its name.
    pub name: String,
    /// The live generation.
    pub generation: i32,
    /// The code version of the live generation.
    pub code_version: i32,
    /// `running` or `stopped`.
    pub state: String,
    /// Why it stopped, if it did.
    pub error: Option<String>,
    /// Events applied so far.
    pub events: i64,
    /// Dead letters recorded (stopped on, skipped, parked, retried or discarded).
    pub dead_letters: i64,
    /// Streams it holds back, over every partition.
    pub parked_streams: i64,
    /// Total lag over its partitions, when known.
    pub lag: Option<i64>,
    /// When it last applied a batch.
    pub updated_at: DateTime<Utc>,
    /// Its partitions.
    pub partitions: Vec<PartitionStatus>,
    /// The rebuild in progress, if any.
    pub rebuild: Option<RebuildStatus>,
}

impl ProjectionStatus {
    /// The partitions it reads.
    pub fn topic_partitions(&self) -> impl Iterator<Item = TopicPartition> + '_ {
        self.partitions
            .iter()
            .map(|p| TopicPartition::new(p.topic.clone(), p.partition))
    }

    /// Fills in each partition's end and lag, and the total lag, from where the log ends.
    pub fn measure_lag(&mut self, ends: &HashMap<TopicPartition, i64>) {
        for p in &mut self.partitions {
            let end = ends
                .get(&TopicPartition::new(p.topic.clone(), p.partition))
                .copied();
            p.end_at(end);
        }
        self.lag = Some(self.partitions.iter().filter_map(|p| p.lag).sum());
    }
}

/// Reads every projection's status from the database, with the log's ends as the
/// projectors last measured them (`None` where none did).
pub async fn read(pool: &PgPool) -> Result<Vec<ProjectionStatus>, sqlx::Error> {
    type Row = (
        String,
        i32,
        i32,
        String,
        Option<String>,
        i64,
        DateTime<Utc>,
        i64,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT p.name, p.generation, p.code_version, p.state, p.error,
                p.events + COALESCE(c.events, 0)::bigint, GREATEST(p.updated_at, c.updated_at),
                (SELECT count(*) FROM keel_dead_letters d WHERE d.projection = p.name AND d.generation = p.generation)
         FROM keel_projections p
         LEFT JOIN LATERAL (SELECT sum(events) AS events, max(updated_at) AS updated_at FROM keel_checkpoints
                            WHERE projection = p.name AND generation = p.generation) c ON true
         ORDER BY p.name",
    )
    .fetch_all(pool)
    .await?;
    type Checkpoint = (
        String,
        String,
        i32,
        i64,
        i64,
        Option<DateTime<Utc>>,
        Option<String>,
        Option<i64>,
    );
    let checkpoints: Vec<Checkpoint> = sqlx::query_as(
        "SELECT c.projection, c.topic, c.partition, c.next_offset, c.rejected, c.last_record_at, h.name,
                e.end_offset
         FROM keel_checkpoints c
         JOIN keel_projections p ON p.name = c.projection AND p.generation = c.generation
         LEFT JOIN keel_units u ON u.kind = 'run' AND u.projection = c.projection AND u.topic = c.topic
                                AND u.partition = c.partition
         LEFT JOIN keel_projector_processes h ON h.id = u.holder AND h.expires_at > now()
         LEFT JOIN keel_partition_ends e ON e.topic = c.topic AND e.partition = c.partition
         ORDER BY c.projection, c.topic, c.partition",
    )
    .fetch_all(pool)
    .await?;
    let counts: Vec<(String, String, i32, i64)> = missing_is_none(
        sqlx::query_as(
            "SELECT s.projection, s.topic, s.partition, count(*) FROM keel_parked_streams s
             JOIN keel_projections p ON p.name = s.projection AND p.generation = s.generation
             GROUP BY 1, 2, 3",
        )
        .fetch_all(pool)
        .await,
    )?;
    let counts: HashMap<(String, TopicPartition), i64> = counts
        .into_iter()
        .map(|(name, topic, partition, n)| ((name, TopicPartition::new(topic, partition)), n))
        .collect();
    let mut listed: HashMap<(String, TopicPartition), Vec<ParkedStream>> = HashMap::new();
    for p in missing_is_none(parked(pool, None, PARKED_LISTED).await)? {
        listed
            .entry((
                p.projection.clone(),
                TopicPartition::new(p.topic.clone(), p.partition),
            ))
            .or_default()
            .push(p);
    }
    let mut rebuilds: HashMap<String, RebuildStatus> = sqlx::query_as::<_, RebuildStatus>(
        "SELECT projection, generation, code_version, state, error, events, records_done, records_total,
            events_per_second, eta_seconds, owner, started_at, updated_at
         FROM keel_rebuilds",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| (r.projection.clone(), r))
    .collect();
    // Who fills each rebuild: the live holders of its units (none before the units
    // existed, on a database the projector has not migrated yet).
    let helpers: Vec<(String, i64)> = missing_is_none(
        sqlx::query_as(
            "SELECT u.projection, count(DISTINCT u.holder) FROM keel_units u
             JOIN keel_projector_processes p ON p.id = u.holder AND p.expires_at > now()
             WHERE u.kind = 'rebuild' AND cardinality(p.projections) > 0
             GROUP BY u.projection",
        )
        .fetch_all(pool)
        .await,
    )?;
    for (projection, count) in helpers {
        if let Some(rebuild) = rebuilds.get_mut(&projection) {
            rebuild.helpers = count;
        }
    }
    Ok(rows
        .into_iter()
        .map(
            |(name, generation, code_version, state, error, events, updated_at, dead_letters)| {
                let partitions: Vec<PartitionStatus> = checkpoints
                    .iter()
                    .filter(|c| c.0 == name)
                    .map(
                        |(
                            _,
                            topic,
                            partition,
                            next_offset,
                            rejected,
                            last_record_at,
                            held_by,
                            end,
                        )| {
                            let key =
                                (name.clone(), TopicPartition::new(topic.clone(), *partition));
                            let mut status = PartitionStatus {
                                parked_streams: counts.get(&key).copied().unwrap_or(0),
                                parked: listed.remove(&key).unwrap_or_default(),
                                topic: topic.clone(),
                                partition: *partition,
                                next_offset: *next_offset,
                                end_offset: None,
                                lag: None,
                                lag_seconds: None,
                                last_record_at: *last_record_at,
                                held_by: held_by.clone(),
                                rejected: *rejected,
                            };
                            status.end_at(*end);
                            status
                        },
                    )
                    .collect();
                let lag = partitions.iter().map(|p| p.lag).sum::<Option<i64>>();
                let parked_streams = partitions.iter().map(|p| p.parked_streams).sum();
                let rebuild = rebuilds.remove(&name);
                ProjectionStatus {
                    name,
                    generation,
                    code_version,
                    state,
                    error,
                    events,
                    dead_letters,
                    parked_streams,
                    lag,
                    updated_at,
                    rebuild,
                    partitions,
                }
            },
        )
        .collect())
}
