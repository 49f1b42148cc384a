use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use keel_http::{Edge, EdgeSettings};
use keel_kafka::{LogProducer, PartitionReader, ReaderPool, ensure_topics};
use keel_schemas::{SigningKey, TopicPartition, TrustedKeys};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::Settings;
use crate::cluster::{Cluster, Join};
use crate::owner::{KafkaPartition, Stop};
use crate::owners::{OwnerSettings, Owners};
use crate::routes::{AppState, app, topics as topic_names};
use crate::settings::Assignment;

/// How often start-up asks again where the partitions end before it gives up.
const END_OFFSET_ATTEMPTS: u32 = 10;

/// How long the owners left at exit may take to hand their partitions over.
const HANDOFF_ON_EXIT: Duration = Duration::from_secs(5);

/// A built command API: topics ensured, partition owners started, listener bound.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    edge: Edge,
    edge_settings: EdgeSettings,
    /// How long a released owner waits for its successor to ask for the partition.
    handoff_timeout: Duration,
}

impl Application {
    /// Ensures the topics, starts one owner per partition, and binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // The token keys first: a missing or unreadable key stops the start at once.
        let edge = Edge::new(&settings.edge, "command-api").context("setting up authentication")?;
        let topics = ensure_topics(&settings.kafka, &keel_domain::STREAM_TYPES)
            .await
            .context("ensuring the topics")?;
        let snapshot_topics =
            keel_kafka::ensure_snapshot_topics(&settings.kafka, &keel_domain::STREAM_TYPES)
                .await
                .context("ensuring the snapshot topics")?;
        info!(?topics, ?snapshot_topics, instance = %settings.instance, "topics ready");
        let (signing_key, generated) =
            SigningKey::read_or_generate(&settings.signing_key_file, &settings.trusted_keys_file)
                .context("reading the signing key (KEEL_SIGNING_KEY_FILE)")?;
        if generated {
            warn!(
                key_id = signing_key.key_id(),
                path = %settings.signing_key_file.display(),
                trusted = %settings.trusted_keys_file.display(),
                "no signing key was found: generated one and added its public key to the trusted keys"
            );
        }
        info!(key_id = signing_key.key_id(), "signing commits");
        let policy = TrustedKeys::read(&settings.trusted_keys_file)
            .context("reading the trusted keys (KEEL_TRUSTED_KEYS_FILE)")?;
        // Every reader's gate (its own included) would skip this instance's fences: it
        // could take no partition, and in a group would hold the ones it is given unserved.
        if !policy.trusts(signing_key.key_id()) {
            error!(
                key_id = signing_key.key_id(),
                trusted = %settings.trusted_keys_file.display(),
                "the signing key is not in the trusted keys file: no reader would count this instance's fences"
            );
            anyhow::bail!(
                "the signing key {} is not in the trusted keys file {}: no reader would count this \
                 instance's fences, so it cannot serve; add its line (see `command-api --help`) to \
                 the trusted keys file of every process",
                signing_key.key_id(),
                settings.trusted_keys_file.display()
            );
        }
        if policy.is_retired(signing_key.key_id()) {
            anyhow::bail!(
                "the signing key {} is retired in the trusted keys file {}: once a key in service \
                 owns a partition, fences signed with a retired one take nothing; sign with a key \
                 in service",
                signing_key.key_id(),
                settings.trusted_keys_file.display()
            );
        }
        let signing_key = Arc::new(signing_key);
        let producer = LogProducer::new(&settings.kafka).context("creating the producer")?;
        let kafka = &settings.kafka;
        let listener = TcpListener::bind(settings.addr)
            .await
            .with_context(|| format!("binding {}", settings.addr))?;
        let mut owner_settings = OwnerSettings {
            instance: settings.instance.clone(),
            signing_key,
            policy: Arc::new(policy),
            timeout: settings.kafka.timeout,
            partitions: settings.kafka.partitions,
            key_retention: settings.idempotency_retention,
            retake_after: None,
            snapshot_every: settings.snapshot_every,
            flush_pipeline: settings.flush_pipeline,
            snapshot_turns: Arc::new(tokio::sync::Semaphore::new(1)),
            metrics: crate::metrics::CommandMetrics::default(),
        };
        let commands = owner_settings.metrics.clone();
        let (owners, cluster) = match &settings.assignment {
            Assignment::All => (
                Arc::new(Self::own_everything(kafka, &producer, &owner_settings).await?),
                None,
            ),
            Assignment::Group {
                group,
                advertised_url,
                session_timeout,
                handoff_timeout,
                forward_ca_file,
            } => {
                let roots = match forward_ca_file
                    .clone()
                    .or_else(|| settings.edge.tls.as_ref().map(|tls| tls.cert.clone()))
                {
                    Some(path) => std::fs::read(&path).with_context(|| {
                        format!("reading the forwarding CA file {}", path.display())
                    })?,
                    None => Vec::new(),
                };
                let url = match advertised_url {
                    Some(url) => url.clone(),
                    None => format!(
                        "{}://{}",
                        if settings.edge.tls.is_some() {
                            "https"
                        } else {
                            "http"
                        },
                        listener.local_addr()?
                    ),
                };
                // An owner the group still names after another writer fenced it (one the
                // group let go, paused past its session) fences again once that writer
                // has surely learnt it was let go.
                owner_settings.retake_after = Some(*session_timeout);
                let owners = Arc::new(Owners::new(kafka.partitions));
                // One consumer reads every partition this instance owns, each into its own
                // queue, as partitions come and go: one fetch request serves them all.
                let readers = ReaderPool::new(kafka).context("opening the partition readers")?;
                let cluster = Cluster::join(Join {
                    kafka,
                    group: group.clone(),
                    url: url.clone(),
                    session_timeout: *session_timeout,
                    handoff_timeout: *handoff_timeout,
                    owners: Arc::clone(&owners),
                    owner_settings,
                    producer,
                    readers,
                    roots_pem: roots,
                })
                .context("joining the group")?;
                info!(
                    group,
                    url, "joined the group: partitions follow its assignment"
                );
                (owners, Some(cluster))
            }
        };
        let state = AppState {
            owners,
            cluster,
            instance: settings.instance.clone(),
            topics: topic_names(&kafka.topic_prefix),
            partitions: settings.kafka.partitions,
            request_timeout: settings.request_timeout,
            telemetry: crate::routes::Telemetry {
                commands,
                ..Default::default()
            },
        }
        .exporting(&edge);
        let handoff_timeout = match &settings.assignment {
            Assignment::Group {
                handoff_timeout, ..
            } => *handoff_timeout,
            Assignment::All => HANDOFF_ON_EXIT,
        };
        Ok(Self {
            listener,
            state,
            edge,
            handoff_timeout,
            edge_settings: settings.edge,
        })
    }

    /// Starts an owner of every partition: the instance that takes them all.
    async fn own_everything(
        kafka: &keel_kafka::KafkaSettings,
        producer: &LogProducer,
        owner_settings: &OwnerSettings,
    ) -> anyhow::Result<Owners> {
        // One consumer reads every partition this instance owns, each into its own queue:
        // one fetch request serves them all, however many partitions there are. It starts
        // where each partition ends now; each owner reads what is before through a history
        // reader of its own (see KafkaPartition).
        let all: Vec<TopicPartition> = keel_domain::STREAM_TYPES
            .iter()
            .flat_map(|t| {
                (0..kafka.partitions).map(move |p| TopicPartition::new(kafka.topic(t), p))
            })
            .collect();
        // Topics just created may not have a leader yet: asked again for a while.
        let mut attempts = 0;
        let partitions = loop {
            match keel_kafka::end_offsets(kafka, &all).await {
                Ok(ends) => break ends,
                Err(e) if attempts < END_OFFSET_ATTEMPTS => {
                    attempts += 1;
                    warn!(error = %e, "reading where the partitions end failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e).context("reading where the partitions end"),
            }
        };
        let mut readers: HashMap<TopicPartition, PartitionReader> =
            PartitionReader::open_many(kafka, &partitions)
                .context("opening the partition readers")?
                .into_iter()
                .map(|r| (TopicPartition::new(r.topic(), r.partition()), r))
                .collect();
        Owners::start_all(owner_settings, |stream_type, partition| {
            let at = TopicPartition::new(kafka.topic(stream_type), partition);
            let reader = readers
                .remove(&at)
                .with_context(|| format!("no reader for {at}"))?;
            Ok(KafkaPartition::new(producer.clone(), reader, kafka))
        })
    }

    /// The address the listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until Ctrl-C or SIGTERM; then hands every partition over (leaving the group
    /// first, so the others take them while this instance still forwards), stops
    /// accepting, and lets in-flight commands finish.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        info!(
            addr = %self.local_addr()?,
            tls = self.edge_settings.tls.is_some(),
            auth = self.edge_settings.auth.is_some(),
            "command API listening"
        );
        let router = app(self.state.clone(), &self.edge);
        let state = self.state;
        let cluster = state.cluster.clone();
        let owners = Arc::clone(&state.owners);
        let handoff_timeout = self.handoff_timeout;
        let stopped = async move {
            keel_telemetry::shutdown_signal().await;
            if let Some(cluster) = cluster {
                // Alone in the group, nobody will ask: every owner hands over at once.
                let others = cluster.has_others();
                cluster.leave().await;
                if !others {
                    return;
                }
                // Each released owner serves on until its successor asks for it (this
                // instance still answers HTTP meanwhile), or its handoff timeout; then it
                // takes up to that long again to hand over.
                let until =
                    std::time::Instant::now() + handoff_timeout * 2 + Duration::from_secs(1);
                while owners.released() > 0 && std::time::Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        keel_http::serve(self.listener, router, &self.edge_settings, stopped)
            .await
            .context("serving HTTP")?;
        // Whatever still runs (every owner, when this instance took them all) hands over.
        state.owners.stop_all(Stop::Handoff, HANDOFF_ON_EXIT).await;
        info!("stopped");
        Ok(())
    }
}
