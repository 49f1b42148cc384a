//! Membership in a consumer group, used for one thing only: dividing partitions among the
//! instances of a service, and telling each instance who owns the others.
//!
//! The group's consumer reads no records (each partition is paused as it is assigned) and
//! commits no offsets: the assignment decides who makes progress, never what counts, which
//! stays with the partition gate. It uses the classic protocol with the cooperative-sticky
//! assignor, which every Kafka-compatible broker Keel runs on supports (KIP-848 is not
//! needed): a member keeps the partitions it has across rebalances, and a partition moves
//! in two steps, revoked from its old member first, assigned to its new one in the
//! rebalance that follows. A revocation waits (up to [`GroupSettings::revoke_timeout`])
//! until the instance has handed the partitions over, so that a planned handoff never has
//! two writers at work.
//!
//! Each member's `client.id` is its advertised URL: [`GroupMembership::view`] reads the
//! group's members from the group coordinator (and their assignments, where the
//! coordinator reports them), so an instance learns where the others are without a
//! database.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_schemas::TopicPartition;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::{KafkaError, KafkaSettings};

/// How a member joins its group.
#[derive(Clone, Debug)]
pub struct GroupSettings {
    /// The group's id: one per service and topic prefix.
    pub group: String,
    /// The topics whose partitions are divided.
    pub topics: Vec<String>,
    /// This member's advertised URL, its `client.id` in the group.
    pub url: String,
    /// How long the coordinator waits for a member's heartbeat before it takes the
    /// member's partitions away (the longest a dead or paused member holds them).
    pub session_timeout: Duration,
    /// How long a revocation waits for the instance to hand its partitions over.
    pub revoke_timeout: Duration,
}

/// What the group asks of this member.
#[derive(Debug)]
pub enum GroupEvent {
    /// These partitions are now this member's.
    Assigned(Vec<TopicPartition>),
    /// These partitions are no longer this member's. `lost` when the member was dropped
    /// from the group (its session expired, or it was paused): another member may already
    /// own them. The group waits until `handed_over` is dropped or called.
    Revoked {
        /// The partitions.
        partitions: Vec<TopicPartition>,
        /// The member was dropped from the group rather than asked to give them up.
        lost: bool,
        /// Called (or dropped) once they are handed over.
        handed_over: HandedOver,
    },
}

/// Tells the group that revoked partitions are handed over; dropping it does too.
#[derive(Debug)]
pub struct HandedOver(Option<std::sync::mpsc::SyncSender<()>>);

impl HandedOver {
    /// The partitions are handed over.
    pub fn done(mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for HandedOver {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// A member of the group as the coordinator describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMember {
    /// The coordinator's id of the member.
    pub member_id: String,
    /// Its advertised URL (its `client.id`).
    pub url: String,
    /// The partitions assigned to it.
    pub partitions: Vec<TopicPartition>,
}

/// The group as the coordinator describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupView {
    /// `Stable`, `PreparingRebalance`, `CompletingRebalance`, `Empty` or `Dead`.
    pub state: String,
    /// Its members.
    pub members: Vec<GroupMember>,
}

struct GroupContext {
    events: mpsc::UnboundedSender<GroupEvent>,
    revoke_timeout: Duration,
    assigned: Mutex<BTreeSet<TopicPartition>>,
}

impl ClientContext for GroupContext {}

fn partitions_of(list: &TopicPartitionList) -> Vec<TopicPartition> {
    list.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        let partitions = partitions_of(list);
        if partitions.is_empty() {
            return;
        }
        let lost = consumer.assignment_lost();
        if let Ok(mut assigned) = self.assigned.lock() {
            for at in &partitions {
                assigned.remove(at);
            }
        }
        info!(partitions = ?partitions, lost, "partitions revoked");
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let event = GroupEvent::Revoked {
            partitions,
            lost,
            handed_over: HandedOver(Some(tx)),
        };
        // The rebalance goes on once they are handed over (or the instance is gone): the
        // coordinator gives them to another member only after this returns.
        if self.events.send(event).is_ok() && rx.recv_timeout(self.revoke_timeout).is_err() {
            warn!(
                timeout_ms = self.revoke_timeout.as_millis(),
                "revoked partitions were not handed over in time; letting them go"
            );
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                // The group reads nothing: its partitions are read by their owners.
                if let Err(e) = consumer.pause(list) {
                    warn!(error = %e, "pausing the group's partitions");
                }
                let partitions = partitions_of(list);
                if partitions.is_empty() {
                    return;
                }
                if let Ok(mut assigned) = self.assigned.lock() {
                    assigned.extend(partitions.iter().cloned());
                }
                info!(partitions = ?partitions, "partitions assigned");
                let _ = self.events.send(GroupEvent::Assigned(partitions));
            }
            Rebalance::Error(e) => warn!(error = %e, "group rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// This instance's membership in its group. Leaves the group when dropped or
/// [`GroupMembership::leave`]s, revoking (and so handing over) everything it holds first.
pub struct GroupMembership {
    consumer: Arc<BaseConsumer<GroupContext>>,
    group: String,
    timeout: Duration,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for GroupMembership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupMembership")
            .field("group", &self.group)
            .finish()
    }
}

impl GroupMembership {
    /// Joins the group; the events say which partitions this member gets and loses.
    ///
    /// Every member of a group must be configured alike (the coordinator takes the first
    /// member's session timeout and assignor).
    pub fn join(
        kafka: &KafkaSettings,
        settings: &GroupSettings,
    ) -> Result<(Self, mpsc::UnboundedReceiver<GroupEvent>), KafkaError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let context = GroupContext {
            events: tx,
            revoke_timeout: settings.revoke_timeout,
            assigned: Mutex::new(BTreeSet::new()),
        };
        let session_ms = settings.session_timeout.as_millis().max(1);
        // Heartbeats a tenth of the session apart: a member is seen alive many times
        // before it could be taken for dead.
        let heartbeat_ms = (session_ms / 10).clamp(100, 3000);
        let mut config = kafka.client_config();
        config
            .set("group.id", &settings.group)
            .set("client.id", &settings.url)
            .set("group.protocol", "classic")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", session_ms.to_string())
            .set("heartbeat.interval.ms", heartbeat_ms.to_string())
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "latest")
            // It fetches as little as the client allows before its partitions are paused.
            .set("queued.min.messages", "1")
            .set("enable.partition.eof", "false");
        let consumer: BaseConsumer<GroupContext> = config
            .create_with_context(context)
            .map_err(KafkaError::client("creating the group member"))?;
        let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(KafkaError::client(format!(
                "joining group {}",
                settings.group
            )))?;
        let consumer = Arc::new(consumer);
        let stop = Arc::new(AtomicBool::new(false));
        // The rebalance callbacks run on this thread, from poll: a revocation may block it
        // while partitions are handed over, which stalls nothing else.
        let polled = Arc::clone(&consumer);
        let stopping = Arc::clone(&stop);
        let group = settings.group.clone();
        let thread = std::thread::Builder::new()
            .name("keel-group".into())
            .spawn(move || {
                while !stopping.load(Ordering::Acquire) {
                    match polled.poll(Duration::from_millis(100)) {
                        Some(Ok(message)) => {
                            use rdkafka::Message;
                            debug!(
                                topic = message.topic(),
                                partition = message.partition(),
                                "the group member read a record; it reads none"
                            );
                        }
                        Some(Err(e)) => debug!(error = %e, "group member"),
                        None => {}
                    }
                }
                // Leaving: unsubscribing revokes everything (handed over through the
                // callbacks) and leaves the group.
                polled.unsubscribe();
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while std::time::Instant::now() < deadline
                    && polled
                        .context()
                        .assigned
                        .lock()
                        .is_ok_and(|a| !a.is_empty())
                {
                    polled.poll(Duration::from_millis(100));
                }
                drop(polled);
                info!(group, "left the group");
            })
            .map_err(|e| KafkaError::Reader(format!("starting the group thread: {e}")))?;
        Ok((
            Self {
                consumer,
                group: settings.group.clone(),
                timeout: kafka.timeout,
                stop,
                thread: Mutex::new(Some(thread)),
            },
            rx,
        ))
    }

    /// The group's id.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The partitions this member holds now.
    pub fn assigned(&self) -> Vec<TopicPartition> {
        self.consumer
            .context()
            .assigned
            .lock()
            .map(|a| a.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The group's members and their partitions, from the coordinator.
    pub async fn view(&self) -> Result<GroupView, KafkaError> {
        let consumer = Arc::clone(&self.consumer);
        let (group, timeout) = (self.group.clone(), self.timeout);
        tokio::task::spawn_blocking(move || {
            let list = consumer
                .fetch_group_list(Some(&group), timeout)
                .map_err(KafkaError::client(format!("describing group {group}")))?;
            let Some(info) = list.groups().iter().find(|g| g.name() == group) else {
                return Ok(GroupView {
                    state: "Dead".into(),
                    members: Vec::new(),
                });
            };
            Ok(GroupView {
                state: info.state().to_owned(),
                members: info
                    .members()
                    .iter()
                    .map(|m| GroupMember {
                        member_id: m.id().to_owned(),
                        url: client_id_of(m.client_id(), m.id()).to_owned(),
                        partitions: m
                            .assignment()
                            .and_then(parse_assignment)
                            .unwrap_or_default(),
                    })
                    .collect(),
            })
        })
        .await
        .map_err(|e| KafkaError::Timeout(format!("describing the group: {e}")))?
    }

    /// Leaves the group: every partition is revoked (and handed over) first. Returns once
    /// the member has left.
    pub async fn leave(&self) {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for GroupMembership {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// A member's client id: as the coordinator reports it, or else from its member id, which
/// coordinators make as `<client id>-<UUID>`.
fn client_id_of<'a>(client_id: &'a str, member_id: &'a str) -> &'a str {
    if !client_id.is_empty() {
        return client_id;
    }
    match member_id.len().checked_sub(37) {
        Some(at) if member_id.is_char_boundary(at) && member_id[at..].starts_with('-') => {
            &member_id[..at]
        }
        _ => member_id,
    }
}

/// The partitions of a consumer-protocol assignment (version, then topics with their
/// partitions, then user data, all big-endian); `None` when it cannot be read.
pub fn parse_assignment(bytes: &[u8]) -> Option<Vec<TopicPartition>> {
    struct Cursor<'a>(&'a [u8]);
    impl Cursor<'_> {
        fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
            let (head, rest) = self.0.split_first_chunk::<N>()?;
            self.0 = rest;
            Some(*head)
        }
        fn i16(&mut self) -> Option<i16> {
            self.take::<2>().map(i16::from_be_bytes)
        }
        fn i32(&mut self) -> Option<i32> {
            self.take::<4>().map(i32::from_be_bytes)
        }
        fn string(&mut self) -> Option<String> {
            let len = usize::try_from(self.i16()?).ok()?;
            if self.0.len() < len {
                return None;
            }
            let (text, rest) = self.0.split_at(len);
            self.0 = rest;
            String::from_utf8(text.to_vec()).ok()
        }
    }
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let mut cursor = Cursor(bytes);
    let _version = cursor.i16()?;
    let topics = cursor.i32()?;
    let mut partitions = Vec::new();
    for _ in 0..topics.max(0) {
        let topic = cursor.string()?;
        let count = cursor.i32()?;
        for _ in 0..count.max(0) {
            partitions.push(TopicPartition::new(topic.clone(), cursor.i32()?));
        }
    }
    Some(partitions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_s_client_id_comes_from_its_member_id_when_not_reported() {
        assert_eq!(
            client_id_of(
                "",
                "http://127.0.0.1:8080-c156601a-653e-41dc-9748-666c7ed52819"
            ),
            "http://127.0.0.1:8080"
        );
        assert_eq!(client_id_of("http://a:1", "whatever"), "http://a:1");
        assert_eq!(client_id_of("", "short"), "short");
    }

    #[test]
    fn an_assignment_reads_as_its_topics_partitions() {
        let mut bytes = vec![0, 1, 0, 0, 0, 2];
        for (topic, parts) in [
            ("t.order.events", vec![0i32, 3]),
            ("t.product.events", vec![7]),
        ] {
            bytes.extend((topic.len() as i16).to_be_bytes());
            bytes.extend(topic.as_bytes());
            bytes.extend((parts.len() as i32).to_be_bytes());
            for p in parts {
                bytes.extend(p.to_be_bytes());
            }
        }
        bytes.extend((-1i32).to_be_bytes());
        assert_eq!(
            parse_assignment(&bytes).unwrap(),
            vec![
                TopicPartition::new("t.order.events", 0),
                TopicPartition::new("t.order.events", 3),
                TopicPartition::new("t.product.events", 7),
            ]
        );
        assert_eq!(parse_assignment(&[]).unwrap(), Vec::new());
        assert_eq!(
            parse_assignment(&bytes[..9]),
            None,
            "a truncated one is refused"
        );
    }
}
