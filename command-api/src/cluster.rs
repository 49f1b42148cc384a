//! Several instances sharing the partitions: this instance's membership in the group (its
//! owners started and stopped as the group assigns and revokes partitions), the group's
//! view of who owns the others (refreshed from the coordinator), and forwarding a command
//! to the instance that owns its stream's partition.
//!
//! Assignment decides who makes progress, never what counts: an owner that still
//! believes it owns a partition it lost may append, but the gate of every reader (its own
//! included) skips what it wrote after the new owner's fence, so it acknowledges nothing.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use keel_kafka::{
    GroupEvent, GroupMembership, GroupSettings, GroupView, KafkaSettings, LogProducer, ReaderPool,
};
use keel_schemas::TopicPartition;
use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};

use crate::error::ApiError;
use crate::owner::{KafkaPartition, Stop};
use crate::owners::{OwnerSettings, Owners};

/// The header that marks a request forwarded by another instance (its writer name): the
/// receiver never forwards it again.
pub const FORWARDED_BY: &str = "keel-forwarded-by";
/// The header that carries the caller's remaining patience to the owner, in milliseconds.
pub const DEADLINE_MS: &str = "keel-deadline-ms";

/// The request headers a forwarded command keeps: the caller's identity (its token, which
/// the owner checks itself), and everything the command records or depends on.
const FORWARDED_REQUEST_HEADERS: [&str; 8] = [
    "authorization",
    "content-type",
    "idempotency-key",
    "if-match",
    "traceparent",
    "tracestate",
    "x-correlation-id",
    "x-causation-id",
];

/// The response headers relayed back from the owner.
const RELAYED_RESPONSE_HEADERS: [&str; 6] = [
    "content-type",
    "etag",
    "location",
    "retry-after",
    "idempotent-replayed",
    keel_schemas::CONSISTENCY_TOKEN_HEADER,
];

/// How often the group's view is read from the coordinator when nothing asks sooner.
const VIEW_REFRESH: Duration = Duration::from_secs(1);
/// How long a member may take to say which partitions it serves.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// What `GET /owned` answers: the instance's URL and the partitions it serves.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Owned {
    /// The instance's URL, if it is one of a group.
    pub url: Option<String>,
    /// (topic, partition) of each partition it serves.
    pub serving: Vec<(String, i32)>,
}

/// The group as this instance sees it.
pub struct Cluster {
    url: String,
    instance: String,
    group: String,
    membership: GroupMembership,
    seen: RwLock<Seen>,
    refresh: Notify,
    client: reqwest::Client,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("url", &self.url)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

/// What was last read of the group.
#[derive(Default)]
struct Seen {
    /// The coordinator's last answer.
    view: Option<GroupView>,
    /// When it came.
    at: Option<Instant>,
    /// Why the last read failed, if it did.
    error: Option<String>,
    /// Each partition's owner URL: the instance that says it serves it.
    owner_of: HashMap<TopicPartition, String>,
}

/// How an instance joins its group.
pub struct Join<'a> {
    /// Kafka.
    pub kafka: &'a KafkaSettings,
    /// The group's id.
    pub group: String,
    /// This instance's URL.
    pub url: String,
    /// How long the group waits for a silent member.
    pub session_timeout: Duration,
    /// How long a handoff may take.
    pub handoff_timeout: Duration,
    /// Its owners.
    pub owners: Arc<Owners>,
    /// What they are started with.
    pub owner_settings: OwnerSettings,
    /// The producer they share.
    pub producer: LogProducer,
    /// The consumer their readers share.
    pub readers: ReaderPool,
    /// PEM certificates trusted when forwarding over https.
    pub roots_pem: Vec<u8>,
}

impl Cluster {
    /// Joins the group: from then on the instance's owners follow its assignment, and the
    /// view of the group is kept fresh.
    pub fn join(join: Join<'_>) -> anyhow::Result<Arc<Self>> {
        let kafka = join.kafka;
        let topics: Vec<String> = keel_domain::STREAM_TYPES
            .iter()
            .map(|t| kafka.topic(t))
            .collect();
        let stream_types: HashMap<String, &'static str> = keel_domain::STREAM_TYPES
            .iter()
            .map(|t| (kafka.topic(t), *t))
            .collect();
        let (membership, events) = GroupMembership::join(
            kafka,
            &GroupSettings {
                group: join.group.clone(),
                topics,
                url: join.url.clone(),
                session_timeout: join.session_timeout,
                // The owners' own stop is bounded by the handoff timeout; the group waits a
                // little longer so that it never moves a partition before that.
                revoke_timeout: join.handoff_timeout + Duration::from_secs(1),
            },
        )?;
        keel_http::serve::use_ring_provider();
        let mut client = reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(30));
        if !join.roots_pem.is_empty() {
            for root in reqwest::Certificate::from_pem_bundle(&join.roots_pem)
                .map_err(|e| anyhow::anyhow!("reading the forwarding CA certificates: {e}"))?
            {
                client = client.add_root_certificate(root);
            }
        }
        let client = client
            .build()
            .map_err(|e| anyhow::anyhow!("building the forwarding client: {e:?}"))?;
        let cluster = Arc::new(Self {
            url: join.url,
            instance: join.owner_settings.instance.clone(),
            group: join.group,
            membership,
            seen: RwLock::new(Seen::default()),
            refresh: Notify::new(),
            client,
        });
        let follower = Follower {
            owners: join.owners,
            owner_settings: join.owner_settings,
            producer: join.producer,
            readers: join.readers,
            kafka: kafka.clone(),
            stream_types,
            handoff_timeout: join.handoff_timeout,
            cluster: Arc::downgrade(&cluster),
        };
        tokio::spawn(follower.follow(events));
        tokio::spawn(Self::watch(Arc::downgrade(&cluster)));
        Ok(cluster)
    }

    /// This instance's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The group's id.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The partitions the group gave this instance.
    pub fn assigned(&self) -> Vec<TopicPartition> {
        self.membership.assigned()
    }

    /// The URL of the instance that owns `at`, as last seen.
    pub fn owner_of(&self, at: &TopicPartition) -> Option<String> {
        self.seen.read().ok()?.owner_of.get(at).cloned()
    }

    /// The last view of the group, when it was read, and why the last read failed.
    pub fn view(&self) -> (Option<GroupView>, Option<Duration>, Option<String>) {
        match self.seen.read() {
            Ok(seen) => (
                seen.view.clone(),
                seen.at.map(|at| at.elapsed()),
                seen.error.clone(),
            ),
            Err(_) => (None, None, None),
        }
    }

    /// Asks for the view to be read again now.
    pub fn refresh_soon(&self) {
        self.refresh.notify_one();
    }

    /// Leaves the group: every partition of this instance is handed over first.
    pub async fn leave(&self) {
        info!(group = %self.group, "leaving the group: handing every partition over");
        self.membership.leave().await;
    }

    /// Reads the group's view every [`VIEW_REFRESH`] or when asked, and asks each other
    /// member which partitions it serves (`GET /owned`: not every coordinator reports
    /// members' assignments, and an assignment is not yet an owner that serves), while
    /// the cluster lives.
    async fn watch(cluster: std::sync::Weak<Self>) {
        loop {
            let Some(this) = cluster.upgrade() else {
                return;
            };
            let read = this.membership.view().await;
            let owner_of = match &read {
                Ok(view) => Some(this.ask_members(view).await),
                Err(_) => None,
            };
            if let Ok(mut seen) = this.seen.write() {
                match read {
                    Ok(view) => {
                        if let Some(owner_of) = owner_of {
                            seen.owner_of = owner_of;
                        }
                        seen.view = Some(view);
                        seen.at = Some(Instant::now());
                        seen.error = None;
                    }
                    Err(e) => seen.error = Some(e.to_string()),
                }
            }
            let refreshed = async { this.refresh.notified().await };
            tokio::select! {
                () = refreshed => {}
                () = tokio::time::sleep(VIEW_REFRESH) => {}
            }
        }
    }

    /// Which member serves each partition: this instance's own (its URL, for the
    /// partitions the group gave it), and what each other member says it serves.
    async fn ask_members(&self, view: &GroupView) -> HashMap<TopicPartition, String> {
        let mut owner_of: HashMap<TopicPartition, String> = self
            .membership
            .assigned()
            .into_iter()
            .map(|at| (at, self.url.clone()))
            .collect();
        let others: std::collections::BTreeSet<&str> = view
            .members
            .iter()
            .map(|m| m.url.as_str())
            .filter(|url| *url != self.url && !url.is_empty())
            .collect();
        let asked = others.into_iter().map(|url| async move {
            let answer = self
                .client
                .get(format!("{url}/owned"))
                .timeout(ASK_TIMEOUT)
                .send()
                .await
                .ok()?
                .json::<Owned>()
                .await
                .ok()?;
            Some((url.to_owned(), answer))
        });
        for (url, owned) in futures::future::join_all(asked).await.into_iter().flatten() {
            for (topic, partition) in owned.serving {
                owner_of
                    .entry(TopicPartition::new(topic, partition))
                    .or_insert_with(|| url.clone());
            }
        }
        owner_of
    }

    /// Forwards a command (its path, the headers that matter, its body) to the instance
    /// at `url`, which owns its partition, and relays the answer; `within` is the caller's
    /// remaining patience.
    pub async fn forward(
        &self,
        url: &str,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
        within: Duration,
    ) -> Result<Response, ApiError> {
        let mut request = self
            .client
            .post(format!("{url}{path}"))
            .timeout(within)
            .header(FORWARDED_BY, &self.instance)
            .header(DEADLINE_MS, within.as_millis().to_string())
            .body(body);
        for name in FORWARDED_REQUEST_HEADERS {
            for value in headers.get_all(name) {
                request = request.header(name, value);
            }
        }
        let unreachable = |e: reqwest::Error| {
            warn!(owner = url, error = %e, "forwarding a command failed");
            ApiError::Unavailable(format!(
                "the partition's owner at {url} did not answer ({}); retry with the same Idempotency-Key",
                if e.is_timeout() {
                    "timed out"
                } else {
                    "unreachable"
                }
            ))
        };
        let answer = request.send().await.map_err(unreachable)?;
        let status =
            StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let mut relayed = HeaderMap::new();
        for name in RELAYED_RESPONSE_HEADERS {
            if let Some(value) = answer.headers().get(name)
                && let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_bytes(value.as_bytes()),
                )
            {
                relayed.insert(name, value);
            }
        }
        let body = answer.bytes().await.map_err(unreachable)?;
        let mut response = (status, body).into_response();
        response.headers_mut().extend(relayed);
        Ok(response)
    }
}

/// Starts and stops this instance's owners as the group assigns and revokes partitions.
struct Follower {
    owners: Arc<Owners>,
    owner_settings: OwnerSettings,
    producer: LogProducer,
    readers: ReaderPool,
    kafka: KafkaSettings,
    stream_types: HashMap<String, &'static str>,
    handoff_timeout: Duration,
    cluster: std::sync::Weak<Cluster>,
}

impl Follower {
    async fn follow(self, mut events: mpsc::UnboundedReceiver<GroupEvent>) {
        while let Some(event) = events.recv().await {
            match event {
                GroupEvent::Assigned(partitions) => {
                    for at in &partitions {
                        self.start(at).await;
                    }
                }
                GroupEvent::Revoked {
                    partitions,
                    lost,
                    handed_over,
                } => {
                    let how = if lost { Stop::Lost } else { Stop::Handoff };
                    let stops = partitions.iter().filter_map(|at| {
                        let stream_type = self.stream_types.get(&at.topic)?;
                        Some(
                            self.owners
                                .stop(stream_type, at.partition, how, self.handoff_timeout),
                        )
                    });
                    futures::future::join_all(stops).await;
                    handed_over.done();
                }
            }
            if let Some(cluster) = self.cluster.upgrade() {
                cluster.refresh_soon();
            }
        }
    }

    /// Starts the owner of `at`, reading it from where it ends now on (and its history
    /// through a reader of its own); tries again while the broker does not answer.
    async fn start(&self, at: &TopicPartition) {
        let Some(stream_type) = self.stream_types.get(&at.topic) else {
            warn!(%at, "assigned a partition of a topic that is not an aggregate's");
            return;
        };
        let mut attempt = 0u32;
        loop {
            let started = async {
                let ends = self.readers.end_offsets(std::slice::from_ref(at)).await?;
                let end = ends.first().map_or(0, |(_, end)| *end);
                let reader = self.readers.open(at, end)?;
                let log = KafkaPartition::new(self.producer.clone(), reader, &self.kafka);
                self.owners
                    .start(stream_type, at.partition, log, &self.owner_settings)
            };
            match started.await {
                Ok(()) => return,
                Err(e) if attempt < 10 => {
                    attempt += 1;
                    warn!(%at, error = %e, "starting the partition's owner failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    warn!(%at, error = %e, "could not start the partition's owner: it stays unserved until the next rebalance");
                    return;
                }
            }
        }
    }
}
