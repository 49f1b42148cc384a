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
use keel_schemas::{SignatureCheck, SigningKey, TopicPartition, TrustedKeys};
use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};

use crate::error::ApiError;
use crate::owner::{AskPredecessor, KafkaPartition, Status, Stop};
use crate::owners::{OwnerSettings, Owners};

/// The header that marks a request forwarded by another instance (its writer name): the
/// receiver never forwards it again.
pub const FORWARDED_BY: &str = "keel-forwarded-by";
/// The header that carries the caller's remaining patience to the owner, in milliseconds.
pub const DEADLINE_MS: &str = "keel-deadline-ms";
/// The header of a forwarded command's `503` from an instance that does not own its
/// partition: the forwarding instance looks for the owner again.
pub const NOT_OWNER: &str = "keel-not-owner";
/// The header of such a `503` naming the member the partition moved to, when the
/// instance knows it (it handed the partition over to that member moments ago): the
/// forwarding instance sends the command there without waiting to read the group again.
pub const MOVED_TO: &str = "keel-moved-to";

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
const VIEW_REFRESH: Duration = Duration::from_millis(500);
/// How long a member may take to say which partitions it serves.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// How old a member's signed answer may be.
const OWNED_FRESH_MS: i64 = 30_000;

/// What `GET /owned` answers: the instance's URL and the partitions it serves, when, signed
/// with its signing key. Commands (with their callers' tokens) are forwarded only to an
/// instance whose answer a trusted key signed, so a stranger that joins the group gets
/// none.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Owned {
    /// The instance's URL, if it is one of a group.
    pub url: Option<String>,
    /// (topic, partition) of each partition it serves.
    pub serving: Vec<(String, i32)>,
    /// When it answered, in milliseconds since the epoch.
    #[serde(default)]
    pub at_ms: i64,
    /// Its signature over [`Owned::digest`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<keel_schemas::Signature>,
}

impl Owned {
    /// What the signature signs: the hex SHA-256 of the answer without it.
    pub fn digest(&self) -> String {
        sha256_of(&Self {
            signature: None,
            ..self.clone()
        })
    }

    /// True when a key `policy` trusts (not retired) signed it, for `url`, lately.
    fn holds(&self, policy: &TrustedKeys, url: &str) -> bool {
        self.url.as_deref() == Some(url)
            && signed_lately(policy, &self.digest(), self.signature.as_ref(), self.at_ms)
    }
}

/// What the member marks a `POST /handoff` request with, so that no other signed message
/// (an `/owned` answer) can stand for one.
const HANDOFF_PURPOSE: &str = "keel-handoff-v1";

/// What `POST /handoff` carries: a member (`from`) whose owner has read a partition the
/// group gave it asks the member serving it (`to`) to hand it over; signed with the
/// asking member's instance key.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct HandoffAsk {
    /// Always [`HANDOFF_PURPOSE`].
    pub purpose: String,
    /// The asking member's URL.
    pub from: String,
    /// The URL of the member asked.
    pub to: String,
    /// (topic, partition) of each partition asked for.
    pub partitions: Vec<(String, i32)>,
    /// When it asked, in milliseconds since the epoch.
    pub at_ms: i64,
    /// Its signature over [`HandoffAsk::digest`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<keel_schemas::Signature>,
}

impl HandoffAsk {
    /// What the signature signs: the hex SHA-256 of the request without it.
    pub fn digest(&self) -> String {
        sha256_of(&Self {
            signature: None,
            ..self.clone()
        })
    }
}

/// The hex SHA-256 of `unsigned`'s JSON: what an instance's signature over a message
/// between instances signs.
fn sha256_of(unsigned: &impl serde::Serialize) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(
        serde_json::to_vec(unsigned).unwrap_or_default(),
    ))
}

/// True when `signature` over `digest` is by a key `policy` trusts and has not retired,
/// and `at_ms` is recent.
fn signed_lately(
    policy: &TrustedKeys,
    digest: &str,
    signature: Option<&keel_schemas::Signature>,
    at_ms: i64,
) -> bool {
    let fresh = (chrono::Utc::now().timestamp_millis() - at_ms).abs() <= OWNED_FRESH_MS;
    let signer = signature.map(|s| s.key_id.as_str());
    fresh
        && signer.is_some_and(|k| !policy.is_retired(k))
        && policy.check(digest, signature) == SignatureCheck::Valid
}

/// The group as this instance sees it.
pub struct Cluster {
    url: String,
    instance: String,
    group: String,
    membership: GroupMembership,
    signing_key: Arc<SigningKey>,
    policy: Arc<TrustedKeys>,
    seen: RwLock<Seen>,
    refresh: Notify,
    client: reqwest::Client,
    handoff_timeout: Duration,
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
    /// Each partition another member says it serves, and that member's URL.
    served_by: HashMap<TopicPartition, String>,
    /// Every member's URL and when the group last named it: a member that left lately
    /// (stopping, it serves on until its successors ask for its partitions) is still
    /// asked what it serves.
    lately: HashMap<String, Instant>,
    /// Partitions handed over moments ago, the member each went to, and when that was
    /// learnt: newer than the view until a view read after it names a member serving the
    /// partition, or [`MOVED_FRESH`] passes.
    moved: HashMap<TopicPartition, (String, Instant)>,
}

impl Seen {
    /// The member `at` moved to, if it moved lately and no view read since says who
    /// serves it.
    fn moved_to(&self, at: &TopicPartition) -> Option<&String> {
        self.moved
            .get(at)
            .filter(|(url, when)| when.elapsed() <= MOVED_FRESH && self.is_member(url))
            .map(|(url, _)| url)
    }

    /// True when the last view names `url` among the group's members.
    fn is_member(&self, url: &str) -> bool {
        self.view
            .as_ref()
            .is_some_and(|view| view.members.iter().any(|m| m.url == url))
    }

    /// Takes the members' answers of a view read that started at `started`: a
    /// partition moved before then, which a member now says it serves, is routed by the
    /// view again.
    fn answered(
        &mut self,
        owner_of: HashMap<TopicPartition, String>,
        served_by: HashMap<TopicPartition, String>,
        started: Instant,
    ) {
        self.moved.retain(|at, (_, when)| {
            when.elapsed() <= MOVED_FRESH && (*when >= started || !served_by.contains_key(at))
        });
        self.owner_of = owner_of;
        self.served_by = served_by;
    }
}

/// How long a partition's move learnt from a handoff routes its commands, unless a view
/// of the group read since says who serves it.
const MOVED_FRESH: Duration = Duration::from_secs(5);

/// How long, besides twice the handoff timeout, a member that left the group is still
/// asked which partitions it serves.
const LEFT_LATELY: Duration = Duration::from_secs(5);
/// How long a member that left the group may take to say what it still serves.
const ASK_LEFT_TIMEOUT: Duration = Duration::from_millis(250);

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
            signing_key: Arc::clone(&join.owner_settings.signing_key),
            policy: Arc::clone(&join.owner_settings.policy),
            seen: RwLock::new(Seen::default()),
            refresh: Notify::new(),
            client,
            handoff_timeout: join.handoff_timeout,
        });
        let follower = Follower {
            starter: Arc::new(Starter {
                owners: join.owners,
                owner_settings: join.owner_settings,
                producer: join.producer,
                readers: join.readers,
                kafka: kafka.clone(),
                stream_types,
                cluster: Arc::downgrade(&cluster),
                handoff_timeout: join.handoff_timeout,
            }),
            handoff_timeout: join.handoff_timeout,
            cluster: Arc::downgrade(&cluster),
        };
        tokio::spawn(follower.follow(events));
        tokio::spawn(Self::watch(Arc::downgrade(&cluster)));
        Ok(cluster)
    }

    /// This instance's answer to `GET /owned`: `serving`, signed.
    pub fn owned(&self, serving: Vec<(String, i32)>) -> Owned {
        let unsigned = Owned {
            url: Some(self.url.clone()),
            serving,
            at_ms: chrono::Utc::now().timestamp_millis(),
            signature: None,
        };
        Owned {
            signature: Some(self.signing_key.sign(&unsigned.digest())),
            ..unsigned
        }
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

    /// The URL of the instance that owns `at`, as last seen (or learnt since from its
    /// handoff).
    pub fn owner_of(&self, at: &TopicPartition) -> Option<String> {
        let seen = self.seen.read().ok()?;
        seen.moved_to(at).or_else(|| seen.owner_of.get(at)).cloned()
    }

    /// The URL of the other member that says it serves `at`, as last seen (or the member
    /// it was handed over to since).
    pub fn served_by(&self, at: &TopicPartition) -> Option<String> {
        let seen = self.seen.read().ok()?;
        seen.moved_to(at)
            .or_else(|| seen.served_by.get(at))
            .cloned()
    }

    /// Notes that `at` moved to the member at `url` (this instance handed it over to
    /// that member, or the member that did says so): commands for it go there while it
    /// fences, instead of waiting until a member says it serves the partition. Ignored
    /// unless `url` is another member of the group as last seen: commands carry their
    /// callers' tokens, so they go to members only. Routing only: the fence decides who
    /// owns the partition, and a member that does not answers `503`.
    pub fn note_moved(&self, at: &TopicPartition, url: &str) {
        let Ok(mut seen) = self.seen.write() else {
            return;
        };
        if url == self.url {
            // It moved here: whatever was noted before is past.
            seen.moved.remove(at);
        } else if seen.is_member(url) {
            seen.moved
                .insert(at.clone(), (url.to_owned(), Instant::now()));
        }
    }

    /// The member this instance handed `at` over to moments ago, if it did.
    pub fn moved_to(&self, at: &TopicPartition) -> Option<String> {
        self.seen.read().ok()?.moved_to(at).cloned()
    }

    /// Forgets a move to `url` noted by [`Cluster::note_moved`] (the handoff did not
    /// happen); a move noted since, elsewhere, stays.
    pub fn forget_moved(&self, at: &TopicPartition, url: &str) {
        if let Ok(mut seen) = self.seen.write()
            && seen.moved.get(at).is_some_and(|(to, _)| to == url)
        {
            seen.moved.remove(at);
        }
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

    /// True when the last view of the group names a member besides this instance.
    pub fn has_others(&self) -> bool {
        self.seen.read().ok().is_some_and(|seen| {
            seen.view
                .as_ref()
                .is_some_and(|view| view.members.iter().any(|m| m.url != self.url))
        })
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
            let started = Instant::now();
            let read = this.membership.view().await;
            let asked: Vec<String> = match (&read, this.seen.write()) {
                (Ok(view), Ok(mut seen)) => {
                    let now = Instant::now();
                    for member in &view.members {
                        seen.lately.insert(member.url.clone(), now);
                    }
                    let lately = this.handoff_timeout * 2 + LEFT_LATELY;
                    seen.lately.retain(|_, at| at.elapsed() <= lately);
                    seen.lately.keys().cloned().collect()
                }
                _ => Vec::new(),
            };
            let owner_of = match &read {
                Ok(view) => {
                    let members: Vec<&str> = view.members.iter().map(|m| m.url.as_str()).collect();
                    Some(this.ask_members(&asked, &members).await)
                }
                Err(_) => None,
            };
            if let Ok(mut seen) = this.seen.write() {
                match read {
                    Ok(view) => {
                        if let Some((owner_of, served_by)) = owner_of {
                            seen.answered(owner_of, served_by, started);
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
    /// partitions the group gave it), and what each other member (`members`: their URLs,
    /// those that left lately included) says it serves; and, apart, what the other
    /// members say they serve.
    async fn ask_members(
        &self,
        members: &[String],
        current: &[&str],
    ) -> (
        HashMap<TopicPartition, String>,
        HashMap<TopicPartition, String>,
    ) {
        let mut owner_of: HashMap<TopicPartition, String> = self
            .membership
            .assigned()
            .into_iter()
            .map(|at| (at, self.url.clone()))
            .collect();
        let mut served_by = HashMap::new();
        let others: std::collections::BTreeSet<&str> = members
            .iter()
            .map(String::as_str)
            .filter(|url| *url != self.url && !url.is_empty())
            .collect();
        let asked = others.into_iter().map(|url| async move {
            let timeout = if current.contains(&url) {
                ASK_TIMEOUT
            } else {
                ASK_LEFT_TIMEOUT
            };
            let answer = self
                .client
                .get(format!("{url}/owned"))
                .timeout(timeout)
                .send()
                .await
                .ok()?
                .json::<Owned>()
                .await
                .ok()?;
            Some((url.to_owned(), answer))
        });
        for (url, owned) in futures::future::join_all(asked).await.into_iter().flatten() {
            if !owned.holds(&self.policy, &url) {
                warn!(
                    member = url,
                    "a member's answer is not signed by a trusted key: nothing is forwarded to it"
                );
                continue;
            }
            for (topic, partition) in owned.serving {
                let at = TopicPartition::new(topic, partition);
                owner_of.entry(at.clone()).or_insert_with(|| url.clone());
                served_by.insert(at, url.clone());
            }
        }
        (owner_of, served_by)
    }

    /// Asks the member that serves `at` now, if another does, to hand it over to this
    /// instance (the group gave it here, and this instance's owner has read it and is about
    /// to fence); waits until it has, at most `within`. The request ([`HandoffAsk`]) is
    /// signed with this instance's key: a member hands over only a partition the group took
    /// from it, and only when another member whose key it trusts asks.
    pub async fn ask_to_hand_over(&self, at: &TopicPartition, within: Duration) {
        let serving = self
            .seen
            .read()
            .ok()
            .and_then(|seen| seen.served_by.get(at).cloned());
        let Some(url) = serving.filter(|url| *url != self.url) else {
            return;
        };
        let unsigned = HandoffAsk {
            purpose: HANDOFF_PURPOSE.into(),
            from: self.url.clone(),
            to: url.clone(),
            partitions: vec![(at.topic.clone(), at.partition)],
            at_ms: chrono::Utc::now().timestamp_millis(),
            signature: None,
        };
        let request = HandoffAsk {
            signature: Some(self.signing_key.sign(&unsigned.digest())),
            ..unsigned
        };
        let started = Instant::now();
        let answer = self
            .client
            .post(format!("{url}/handoff"))
            .timeout(within)
            .json(&request)
            .send()
            .await;
        match answer {
            Ok(answer) if answer.status().is_success() => {
                info!(%at, from = url, ms = started.elapsed().as_millis(), "the partition was handed over on request");
            }
            Ok(answer) => {
                info!(%at, from = url, status = answer.status().as_u16(), "the serving member did not hand the partition over: fencing it");
            }
            Err(e) => {
                warn!(%at, from = url, error = %e, "asking the serving member to hand the partition over failed: fencing it")
            }
        }
    }

    /// True when `ask` (a `POST /handoff` body) is for this instance, from another
    /// instance, and signed by a trusted key in service, lately.
    pub fn signed_for_here(&self, ask: &HandoffAsk) -> bool {
        ask.purpose == HANDOFF_PURPOSE
            && ask.to == self.url
            && ask.from != self.url
            && signed_lately(
                &self.policy,
                &ask.digest(),
                ask.signature.as_ref(),
                ask.at_ms,
            )
    }

    /// True when `url` is a member of the group as last seen.
    pub fn is_member(&self, url: &str) -> bool {
        self.seen
            .read()
            .ok()
            .is_some_and(|seen| seen.is_member(url))
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
    ) -> Result<Forwarded, ApiError> {
        let mut request = self
            .client
            .post(format!("{url}{path}"))
            .timeout(within)
            .header(FORWARDED_BY, &self.instance)
            .header(DEADLINE_MS, within.as_millis().to_string())
            .body(body);
        // Traced, the owner's request span is a child of this one.
        let traceparent = keel_telemetry::trace::current_traceparent();
        for name in FORWARDED_REQUEST_HEADERS {
            if name == "traceparent"
                && let Some(current) = &traceparent
            {
                request = request.header(name, current);
                continue;
            }
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
        // Between instances only: never relayed to the caller.
        let not_owner = answer.headers().contains_key(NOT_OWNER).then(|| {
            answer
                .headers()
                .get(MOVED_TO)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
        let body = answer.bytes().await.map_err(unreachable)?;
        let mut response = (status, body).into_response();
        response.headers_mut().extend(relayed);
        Ok(Forwarded {
            response,
            not_owner,
        })
    }
}

/// A forwarded command's answer, to relay.
pub struct Forwarded {
    /// The answer as the caller gets it.
    pub response: Response,
    /// Set when the instance said it does not own the partition: where it went, when that
    /// instance knows.
    pub not_owner: Option<Option<String>>,
}

/// Starts and stops this instance's owners as the group assigns and revokes partitions.
/// Each owner is started by a task of its own (retrying while the broker does not
/// answer), so a revocation is never held up behind a start: it cancels the partition's
/// start, if one is under way, and stops its owner.
struct Follower {
    starter: Arc<Starter>,
    handoff_timeout: Duration,
    cluster: std::sync::Weak<Cluster>,
}

/// What starting an owner takes.
struct Starter {
    owners: Arc<Owners>,
    owner_settings: OwnerSettings,
    producer: LogProducer,
    readers: ReaderPool,
    kafka: KafkaSettings,
    stream_types: HashMap<String, &'static str>,
    cluster: std::sync::Weak<Cluster>,
    handoff_timeout: Duration,
}

impl Follower {
    async fn follow(self, mut events: mpsc::UnboundedReceiver<GroupEvent>) {
        let mut starting: HashMap<TopicPartition, tokio::task::JoinHandle<()>> = HashMap::new();
        while let Some(event) = events.recv().await {
            starting.retain(|_, task| !task.is_finished());
            match event {
                GroupEvent::Assigned(partitions) => {
                    for at in partitions {
                        if starting.contains_key(&at) {
                            continue;
                        }
                        let starter = Arc::clone(&self.starter);
                        let task = tokio::spawn({
                            let at = at.clone();
                            async move { starter.start(&at).await }
                        });
                        starting.insert(at, task);
                    }
                }
                GroupEvent::Revoked {
                    partitions,
                    lost,
                    handed_over,
                } => {
                    for at in &partitions {
                        if let Some(task) = starting.remove(at) {
                            task.abort();
                            let _ = task.await;
                        }
                    }
                    let starter = &self.starter;
                    let revoked = partitions.iter().filter_map(|at| {
                        Some((*starter.stream_types.get(&at.topic)?, at.partition))
                    });
                    if lost {
                        // Another instance may own them already: stopped before the group
                        // goes on.
                        let stops = revoked.map(|(stream_type, partition)| {
                            starter.owners.stop(
                                stream_type,
                                partition,
                                Stop::Lost,
                                self.handoff_timeout,
                            )
                        });
                        futures::future::join_all(stops).await;
                    } else {
                        // Make-before-break: each serving owner serves on until its
                        // successor has read the partition and asks for it, or the handoff
                        // timeout; one not serving yet stops now.
                        let (serving, not_yet): (Vec<_>, Vec<_>) = revoked.partition(|(t, p)| {
                            starter.owners.status_of(t, *p) == Some(Status::Serving)
                        });
                        let stops = not_yet.into_iter().map(|(stream_type, partition)| {
                            starter.owners.stop(
                                stream_type,
                                partition,
                                Stop::Handoff,
                                self.handoff_timeout,
                            )
                        });
                        futures::future::join_all(stops).await;
                        for (stream_type, partition) in serving {
                            if let Some(number) = starter.owners.release(stream_type, partition) {
                                let owners = Arc::clone(&starter.owners);
                                let within = self.handoff_timeout;
                                tokio::spawn(async move {
                                    tokio::time::sleep(within).await;
                                    owners
                                        .stop_released(stream_type, partition, number, within)
                                        .await;
                                });
                            }
                        }
                    }
                    handed_over.done();
                }
            }
            if let Some(cluster) = self.cluster.upgrade() {
                cluster.refresh_soon();
            }
        }
    }
}

impl Starter {
    /// Starts the owner of `at`, reading it from where it ends now on (and its history
    /// through a reader of its own); tries again, ever more patiently, while the broker
    /// does not answer (the task is cancelled if the partition is revoked meanwhile).
    async fn start(&self, at: &TopicPartition) {
        let Some(stream_type) = self.stream_types.get(&at.topic) else {
            warn!(%at, "assigned a partition of a topic that is not an aggregate's");
            return;
        };
        let mut wait = Duration::from_millis(250);
        loop {
            // Given back before it was handed over: it serves on here (unless another
            // writer fenced it meanwhile: a fresh owner fences again at once).
            if self.owners.keep(stream_type, at.partition) {
                if self.owners.status_of(stream_type, at.partition) == Some(Status::Serving) {
                    return;
                }
                // Not serving (fenced out, or about to find out): a fresh owner asks
                // whoever serves now, then fences.
                self.owners
                    .stop(stream_type, at.partition, Stop::Lost, self.handoff_timeout)
                    .await;
            }
            let started = async {
                let ends = self.readers.end_offsets(std::slice::from_ref(at)).await?;
                let end = ends.first().map_or(0, |(_, end)| *end);
                let reader = self.readers.open(at, end).await?;
                let log = KafkaPartition::new(self.producer.clone(), reader, &self.kafka);
                let (cluster, asked, within) =
                    (self.cluster.clone(), at.clone(), self.handoff_timeout);
                let ask: AskPredecessor = Box::new(move || {
                    Box::pin(async move {
                        if let Some(cluster) = cluster.upgrade() {
                            cluster.ask_to_hand_over(&asked, within).await;
                        }
                    })
                });
                self.owners.start(
                    stream_type,
                    at.partition,
                    log,
                    &self.owner_settings,
                    Some(ask),
                )
            };
            match started.await {
                Ok(()) => return,
                Err(e) => {
                    warn!(%at, error = %e, retry_ms = wait.as_millis(), "starting the partition's owner failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use super::*;

    fn signed(key: &SigningKey, url: &str, at_ms: i64) -> Owned {
        let unsigned = Owned {
            url: Some(url.into()),
            serving: vec![("t.order.events".into(), 3)],
            at_ms,
            signature: None,
        };
        Owned {
            signature: Some(key.sign(&unsigned.digest())),
            ..unsigned
        }
    }

    /// Only a fresh answer for the URL asked, signed by a key in service, routes
    /// commands there.
    #[test]
    fn a_member_s_answer_counts_only_signed_by_a_trusted_key_fresh_and_for_its_url() {
        let (ours, stranger) = (SigningKey::generate(), SigningKey::generate());
        let mut policy = TrustedKeys::default();
        policy.add(&ours);
        let now = chrono::Utc::now().timestamp_millis();
        let url = "http://10.0.0.5:8080";
        assert!(signed(&ours, url, now).holds(&policy, url));
        assert!(
            !signed(&stranger, url, now).holds(&policy, url),
            "untrusted"
        );
        assert!(
            !signed(&ours, url, now).holds(&policy, "http://elsewhere:1"),
            "another URL"
        );
        assert!(
            !signed(&ours, url, now - 120_000).holds(&policy, url),
            "stale"
        );
        let mut widened = signed(&ours, url, now);
        widened.serving.push(("t.order.events".into(), 4));
        assert!(!widened.holds(&policy, url), "changed after signing");
        let unsigned = Owned {
            signature: None,
            ..signed(&ours, url, now)
        };
        assert!(!unsigned.holds(&policy, url), "unsigned");
    }

    /// A partition handed over routes by its move until a view read after the move says
    /// who serves it, or the move is no longer fresh.
    #[test]
    fn a_move_routes_until_a_view_read_after_it_names_who_serves_the_partition() {
        let (at, other) = (
            TopicPartition::new("t.order.events".to_owned(), 3),
            TopicPartition::new("t.order.events".to_owned(), 4),
        );
        let (old, new) = ("http://old:1".to_owned(), "http://new:1".to_owned());
        let member = |url: &str| keel_kafka::GroupMember {
            member_id: url.to_owned(),
            url: url.to_owned(),
            partitions: Vec::new(),
        };
        let mut seen = Seen {
            view: Some(GroupView {
                state: "Stable".into(),
                members: vec![member(&old), member(&new)],
            }),
            ..Seen::default()
        };
        let before = Instant::now();
        seen.moved.insert(at.clone(), (new.clone(), Instant::now()));
        seen.moved
            .insert(other.clone(), (new.clone(), Instant::now()));
        assert_eq!(seen.moved_to(&at), Some(&new));

        // A read that started before the move hears the old member still serving it: the
        // move stands.
        let stale = HashMap::from([(at.clone(), old.clone())]);
        seen.answered(stale.clone(), stale, before);
        assert_eq!(seen.moved_to(&at), Some(&new), "a read older than the move");

        // A read that started after it names who serves it: the view routes again; a
        // partition nobody says it serves yet keeps its move.
        let fresh = HashMap::from([(at.clone(), new.clone())]);
        seen.answered(fresh.clone(), fresh, Instant::now());
        assert_eq!(seen.moved_to(&at), None, "the view knows");
        assert_eq!(seen.moved_to(&other), Some(&new), "nobody serves it yet");

        // A move is a hint for moments, not for good.
        let long_ago = Instant::now()
            .checked_sub(MOVED_FRESH + Duration::from_secs(1))
            .unwrap();
        seen.moved.insert(other.clone(), (new.clone(), long_ago));
        assert_eq!(seen.moved_to(&other), None, "stale");

        // Nor to a member that has left since: commands carry their callers' tokens.
        seen.moved.insert(other.clone(), (new, Instant::now()));
        if let Some(view) = seen.view.as_mut() {
            view.members.retain(|m| m.url == old);
        }
        assert_eq!(seen.moved_to(&other), None, "no longer a member");
    }
}
