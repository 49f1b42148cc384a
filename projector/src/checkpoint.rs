//! Checkpoints: where each partition of a projection's generation has been applied to,
//! with the partition gate's state there, saved in the batch's own transaction. The only
//! file that writes `keel_checkpoints` (whose `latest_fence_at`, from migration 0004, is
//! no longer written: retired keys are decided by log order) and the gate's state (`keel_gate_versions`,
//! `keel_gate_streams`).
//!
//! A partition's stream versions are saved as one row per batch that moved them (holding
//! only those), and now and then as a snapshot of the whole state that replaces the rows
//! before it ([`PartitionState::snapshot_due`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::Context;
use keel_kafka::{PartitionGate, StreamHead, hash_bytes};
use keel_schemas::{StreamRef, TopicPartition, TrustedKeys, Writer};
use sqlx::{PgConnection, PgPool};

use crate::dead_letter::{self, Parked};

/// One partition of a generation: where it has been read to, and the gate's state there.
pub(crate) struct PartitionState {
    /// The next offset to apply.
    pub(crate) next_offset: i64,
    /// The gate, as it stands after the record before `next_offset`.
    pub(crate) gate: PartitionGate,
    /// Streams whose version the batch being applied moved.
    pub(crate) touched_streams: HashSet<StreamRef>,
    /// Whether the batch being applied moved this partition's checkpoint.
    pub(crate) touched: bool,
    /// Events the batch being applied takes from this partition.
    pub(crate) batch_events: u64,
    /// The log time (ms since the epoch) of the last record applied, when the log gave one.
    pub(crate) last_record_ms: Option<i64>,
    /// The streams of the partition the generation holds back, with their held records.
    pub(crate) parked: HashMap<StreamRef, Parked>,
    /// Rows of `keel_gate_versions` since the partition's last snapshot.
    deltas: u32,
    /// Stream versions those rows hold.
    delta_entries: u64,
}

impl PartitionState {
    fn new(policy: &Arc<TrustedKeys>, at: &TopicPartition) -> Self {
        Self {
            next_offset: 0,
            gate: PartitionGate::new(Arc::clone(policy), at),
            touched_streams: HashSet::new(),
            touched: false,
            batch_events: 0,
            last_record_ms: None,
            parked: HashMap::new(),
            deltas: 0,
            delta_entries: 0,
        }
    }

    /// Whether this batch's save of the partition's stream versions is a snapshot: the
    /// whole state as one row, replacing the rows before it. It is once this would be at
    /// least the `every`-th row since the last snapshot, and the rows since then, this
    /// batch's included, hold at least as many versions as the whole state: a snapshot
    /// never writes more than the rows it replaces, and a restore reads at most about
    /// twice the state.
    fn snapshot_due(&self, every: u32) -> bool {
        self.deltas + 1 >= every
            && self.delta_entries + self.touched_streams.len() as u64
                >= self.gate.stream_count() as u64
    }
}

/// Stream heads as a `keel_gate_versions` row holds them: `[type, id, version, hash]`
/// (rows written before the gate kept hashes have no `hash`).
fn encode_versions<'a>(
    heads: impl Iterator<Item = (&'a StreamRef, StreamHead)>,
) -> anyhow::Result<Vec<u8>> {
    let rows: Vec<(&str, &str, u64, Option<String>)> = heads
        .map(|(s, h)| {
            (
                s.stream_type.as_str(),
                s.id.as_str(),
                h.version,
                h.hash.map(hex::encode),
            )
        })
        .collect();
    serde_json::to_vec(&rows).context("encoding the gate's stream versions")
}

/// One stream of a `keel_gate_versions` row, with or without its hash.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum SavedHead {
    WithHash(String, String, u64, Option<String>),
    Version(String, String, u64),
}

impl SavedHead {
    fn into_head(self) -> (StreamRef, StreamHead) {
        let (stream_type, id, version, hash) = match self {
            SavedHead::WithHash(t, id, v, hash) => (t, id, v, hash),
            SavedHead::Version(t, id, v) => (t, id, v, None),
        };
        (
            StreamRef { stream_type, id },
            StreamHead {
                version,
                hash: hash.as_deref().and_then(hash_bytes),
            },
        )
    }
}

/// The checkpoints of every partition one generation of a projection reads.
pub(crate) struct Checkpoints {
    projection: &'static str,
    generation: i32,
    snapshot_every: u32,
    states: HashMap<TopicPartition, PartitionState>,
}

impl Checkpoints {
    /// Loads the checkpoints and gate states of `partitions` (offset 0 and an empty gate
    /// for one never applied).
    pub(crate) async fn load(
        pool: &PgPool,
        projection: &'static str,
        generation: i32,
        partitions: impl IntoIterator<Item = TopicPartition>,
        snapshot_every: u32,
        policy: &Arc<TrustedKeys>,
    ) -> anyhow::Result<Self> {
        let mut states: HashMap<TopicPartition, PartitionState> = partitions
            .into_iter()
            .map(|at| {
                let state = PartitionState::new(policy, &at);
                (at, state)
            })
            .collect();
        type Row = (
            String,
            i32,
            i64,
            Option<String>,
            Option<i64>,
            i64,
            i64,
            i64,
            Option<String>,
            i32,
        );
        let checkpoints: Vec<Row> = sqlx::query_as(
            "SELECT topic, partition, next_offset, owner_instance, owner_epoch, highest_epoch, accepted, rejected,
                owner_key_id, fence_rules
             FROM keel_checkpoints WHERE projection = $1 AND generation = $2",
        )
        .bind(projection)
        .bind(generation)
        .fetch_all(pool)
        .await?;
        let streams: Vec<(String, i32, String, String, i64)> = sqlx::query_as(
            "SELECT topic, partition, stream_type, stream_id, version FROM keel_gate_streams
             WHERE projection = $1 AND generation = $2",
        )
        .bind(projection)
        .bind(generation)
        .fetch_all(pool)
        .await?;
        let mut versions: HashMap<TopicPartition, HashMap<StreamRef, StreamHead>> = HashMap::new();
        for (topic, partition, stream_type, id, version) in streams {
            versions
                .entry(TopicPartition::new(topic, partition))
                .or_default()
                .insert(
                    StreamRef { stream_type, id },
                    StreamHead {
                        version: version as u64,
                        hash: None,
                    },
                );
        }
        // Then the batch and snapshot rows, in log order per partition.
        let rows: Vec<(String, i32, bool, Vec<u8>)> = sqlx::query_as(
            "SELECT topic, partition, snapshot, versions FROM keel_gate_versions
             WHERE projection = $1 AND generation = $2 ORDER BY topic, partition, next_offset",
        )
        .bind(projection)
        .bind(generation)
        .fetch_all(pool)
        .await?;
        for (at, stream, parked) in dead_letter::load_parked(pool, projection, generation).await? {
            if let Some(state) = states.get_mut(&at) {
                state.parked.insert(stream, parked);
            }
        }
        let mut deltas: HashMap<TopicPartition, (u32, u64)> = HashMap::new();
        for (topic, partition, snapshot, bytes) in rows {
            let decoded: Vec<SavedHead> = serde_json::from_slice(&bytes).with_context(|| {
                format!("reading the gate's stream versions of {topic}/{partition}")
            })?;
            let at = TopicPartition::new(topic, partition);
            let map = versions.entry(at.clone()).or_default();
            let count = deltas.entry(at).or_default();
            if snapshot {
                map.clear();
                *count = (0, 0);
            } else {
                *count = (count.0 + 1, count.1 + decoded.len() as u64);
            }
            map.extend(decoded.into_iter().map(SavedHead::into_head));
        }
        for (
            topic,
            partition,
            next_offset,
            instance,
            epoch,
            highest,
            accepted,
            rejected,
            owner_key,
            fence_rules,
        ) in checkpoints
        {
            let at = TopicPartition::new(topic, partition);
            let Some(state) = states.get_mut(&at) else {
                continue;
            };
            let owner = instance.zip(epoch).map(|(instance, epoch)| Writer {
                instance,
                epoch: epoch as u64,
            });
            state.next_offset = next_offset;
            (state.deltas, state.delta_entries) = deltas.get(&at).copied().unwrap_or_default();
            let rules = u32::try_from(fence_rules).unwrap_or(0);
            state.gate = PartitionGate::restore(
                Arc::clone(policy),
                &at,
                owner,
                highest as u64,
                versions.remove(&at).unwrap_or_default(),
                accepted as u64,
                rejected as u64,
            )
            .with_fences(owner_key, rules);
        }
        Ok(Self {
            projection,
            generation,
            snapshot_every,
            states,
        })
    }

    /// Where to start reading each partition, in order.
    pub(crate) fn assignment(&self) -> Vec<(TopicPartition, i64)> {
        let mut assignment: Vec<(TopicPartition, i64)> = self
            .states
            .iter()
            .map(|(at, s)| (at.clone(), s.next_offset))
            .collect();
        assignment.sort();
        assignment
    }

    /// The next offset of a partition.
    pub(crate) fn next_offset(&self, at: &TopicPartition) -> i64 {
        self.states.get(at).map_or(0, |s| s.next_offset)
    }

    /// Records read so far over every partition.
    pub(crate) fn records_done(&self) -> i64 {
        self.states.values().map(|s| s.next_offset).sum()
    }

    /// The state of the partition of `topic`/`partition`, when this generation reads it.
    pub(crate) fn partition_mut(
        &mut self,
        topic: &str,
        partition: i32,
    ) -> Option<&mut PartitionState> {
        // Looked up per record: a borrowed key would need a second map type.
        self.states.get_mut(&TopicPartition::new(topic, partition))
    }

    /// Saves the checkpoint and gate state of every partition the batch moved, in the
    /// batch's transaction `tx`.
    pub(crate) async fn save(&self, tx: &mut PgConnection) -> anyhow::Result<()> {
        let (name, generation) = (self.projection, self.generation);
        let touched: Vec<(&TopicPartition, &PartitionState)> =
            self.states.iter().filter(|(_, s)| s.touched).collect();
        // The streams each partition's batch moved, as one row per partition; or, when due,
        // the partition's whole state as a snapshot that replaces the rows before it.
        let mut rows = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (at, state) in &touched {
            if state.touched_streams.is_empty() {
                continue;
            }
            let snapshot = state.snapshot_due(self.snapshot_every);
            let versions = if snapshot {
                for table in ["keel_gate_versions", "keel_gate_streams"] {
                    sqlx::query(&format!(
                        "DELETE FROM {table} WHERE projection = $1 AND generation = $2 AND topic = $3 AND partition = $4"
                    ))
                    .bind(name)
                    .bind(generation)
                    .bind(&at.topic)
                    .bind(at.partition)
                    .execute(&mut *tx)
                    .await?;
                }
                encode_versions(state.gate.stream_heads())?
            } else {
                encode_versions(
                    state
                        .touched_streams
                        .iter()
                        .filter_map(|s| state.gate.stream_head(s).map(|h| (s, h))),
                )?
            };
            rows.0.push(at.topic.clone());
            rows.1.push(at.partition);
            rows.2.push(state.next_offset);
            rows.3.push(snapshot);
            rows.4.push(versions);
        }
        if !rows.0.is_empty() {
            sqlx::query(
                "INSERT INTO keel_gate_versions (projection, generation, topic, partition, next_offset, snapshot, versions)
                 SELECT $1, $2, * FROM UNNEST($3::text[], $4::int[], $5::bigint[], $6::bool[], $7::bytea[])",
            )
            .bind(name)
            .bind(generation)
            .bind(rows.0)
            .bind(rows.1)
            .bind(rows.2)
            .bind(rows.3)
            .bind(rows.4)
            .execute(&mut *tx)
            .await?;
        }
        for (at, state) in &touched {
            dead_letter::save_parked(tx, name, generation, at, state.parked.iter()).await?;
        }
        if !touched.is_empty() {
            sqlx::query(
                "INSERT INTO keel_checkpoints (projection, generation, topic, partition, next_offset, owner_instance,
                    owner_epoch, highest_epoch, accepted, rejected, owner_key_id, fence_rules, events, last_record_at,
                    updated_at)
                 SELECT $1, $2, t, p, o, oi, oe, he, a, r, ok, fr, e, to_timestamp(lr / 1000.0), now()
                 FROM UNNEST($3::text[], $4::int[], $5::bigint[], $6::text[], $7::bigint[], $8::bigint[], $9::bigint[],
                    $10::bigint[], $11::text[], $12::int[], $13::bigint[], $14::bigint[])
                    AS u(t, p, o, oi, oe, he, a, r, ok, fr, e, lr)
                 ON CONFLICT (projection, generation, topic, partition) DO UPDATE SET
                    events = keel_checkpoints.events + EXCLUDED.events,
                    last_record_at = COALESCE(EXCLUDED.last_record_at, keel_checkpoints.last_record_at),
                    next_offset = EXCLUDED.next_offset, owner_instance = EXCLUDED.owner_instance,
                    owner_epoch = EXCLUDED.owner_epoch, highest_epoch = EXCLUDED.highest_epoch,
                    accepted = EXCLUDED.accepted, rejected = EXCLUDED.rejected,
                    owner_key_id = EXCLUDED.owner_key_id, fence_rules = EXCLUDED.fence_rules,
                    updated_at = now()",
            )
            .bind(name)
            .bind(generation)
            .bind(touched.iter().map(|(at, _)| at.topic.clone()).collect::<Vec<_>>())
            .bind(touched.iter().map(|(at, _)| at.partition).collect::<Vec<_>>())
            .bind(touched.iter().map(|(_, s)| s.next_offset).collect::<Vec<_>>())
            .bind(touched.iter().map(|(_, s)| s.gate.owner().map(|w| w.instance.clone())).collect::<Vec<_>>())
            .bind(touched.iter().map(|(_, s)| s.gate.owner().map(|w| w.epoch as i64)).collect::<Vec<_>>())
            .bind(touched.iter().map(|(_, s)| s.gate.highest_epoch() as i64).collect::<Vec<_>>())
            .bind(touched.iter().map(|(_, s)| s.gate.accepted() as i64).collect::<Vec<_>>())
            .bind(touched.iter().map(|(_, s)| s.gate.rejected() as i64).collect::<Vec<_>>())
            .bind(touched.iter().map(|(_, s)| s.gate.owner_key().map(str::to_owned)).collect::<Vec<_>>())
            .bind(touched.iter().map(|(_, s)| s.gate.fence_rules() as i32).collect::<Vec<_>>())
            .bind(touched.iter().map(|(_, s)| s.batch_events as i64).collect::<Vec<_>>())
            .bind(touched.iter().map(|(_, s)| s.last_record_ms).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    /// After the batch's transaction committed: counts the rows the save wrote towards the
    /// next snapshot, and starts the next batch.
    pub(crate) fn committed(&mut self) {
        let every = self.snapshot_every;
        for state in self.states.values_mut() {
            if !state.touched_streams.is_empty() {
                (state.deltas, state.delta_entries) = if state.snapshot_due(every) {
                    (0, 0)
                } else {
                    (
                        state.deltas + 1,
                        state.delta_entries + state.touched_streams.len() as u64,
                    )
                };
            }
            state.touched = false;
            state.batch_events = 0;
            for parked in state.parked.values_mut() {
                parked.dirty = false;
            }
            state.touched_streams.clear();
        }
    }
}

/// The next offsets of `generation`'s partitions, read in `tx` (the swap's, which holds the
/// projection's lock).
pub(crate) async fn next_offsets(
    tx: &mut PgConnection,
    projection: &str,
    generation: i32,
) -> anyhow::Result<Vec<(TopicPartition, i64)>> {
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT topic, partition, next_offset FROM keel_checkpoints WHERE projection = $1 AND generation = $2",
    )
    .bind(projection)
    .bind(generation)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(topic, partition, next)| (TopicPartition::new(topic, partition), next))
        .collect())
}

/// The generations above `generation` that have checkpoints: what an interrupted clean-up
/// left behind.
pub(crate) async fn generations_above(
    pool: &PgPool,
    projection: &str,
    generation: i32,
) -> anyhow::Result<Vec<i32>> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT generation FROM keel_checkpoints WHERE projection = $1 AND generation > $2",
    )
    .bind(projection)
    .bind(generation)
    .fetch_all(pool)
    .await?)
}

/// Forgets `generation`'s checkpoints and gate state, in `tx`.
pub(crate) async fn discard(
    tx: &mut PgConnection,
    projection: &str,
    generation: i32,
) -> anyhow::Result<()> {
    for table in [
        "keel_checkpoints",
        "keel_gate_streams",
        "keel_gate_versions",
    ] {
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE projection = $1 AND generation = $2"
        ))
        .bind(projection)
        .bind(generation)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_head_keeps_its_hash_and_a_row_saved_without_one_still_reads() {
        let stream = StreamRef {
            stream_type: "order".into(),
            id: "o-1".into(),
        };
        let head = StreamHead {
            version: 3,
            hash: hash_bytes(&"ab".repeat(32)),
        };
        let bytes = encode_versions([(&stream, head)].into_iter()).unwrap();
        let read: Vec<SavedHead> = serde_json::from_slice(&bytes).unwrap();
        let read: Vec<_> = read.into_iter().map(SavedHead::into_head).collect();
        assert_eq!(read, [(stream.clone(), head)]);

        // Rows written before the gate kept hashes: the version, and no hash.
        let legacy: Vec<SavedHead> = serde_json::from_str(r#"[["order","o-1",3]]"#).unwrap();
        let legacy: Vec<_> = legacy.into_iter().map(SavedHead::into_head).collect();
        assert_eq!(
            legacy,
            [(
                stream,
                StreamHead {
                    version: 3,
                    hash: None
                }
            )]
        );
    }
}
