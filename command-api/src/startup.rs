use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use keel_http::{Edge, EdgeSettings};
use keel_kafka::{LogProducer, PartitionReader, ensure_topics};
use keel_schemas::{SigningKey, TopicPartition, TrustedKeys};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::Settings;
use crate::owner::KafkaPartition;
use crate::owners::{OwnerSettings, Owners, Started};
use crate::routes::{AppState, app};

/// How often start-up asks again where the partitions end before it gives up.
const END_OFFSET_ATTEMPTS: u32 = 10;

/// A built command API: topics ensured, partition owners started, listener bound.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    edge: Edge,
    edge_settings: EdgeSettings,
    tasks: JoinSet<()>,
}

impl Application {
    /// Ensures the topics, starts one owner per partition, and binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // The token keys first: a missing or unreadable key stops the start at once.
        let edge = Edge::new(&settings.edge, "command-api").context("setting up authentication")?;
        let topics = ensure_topics(&settings.kafka, &keel_domain::STREAM_TYPES)
            .await
            .context("ensuring the topics")?;
        info!(?topics, instance = %settings.instance, "topics ready");
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
        if !policy.trusts(signing_key.key_id()) {
            // Its own gate, the same as every reader's, will skip its fences.
            error!(
                key_id = signing_key.key_id(),
                trusted = %settings.trusted_keys_file.display(),
                "the signing key is not in the trusted keys file: no reader trusts this instance's fences, so it can take no partition; add its line to the trusted keys file of every process"
            );
        }
        let signing_key = Arc::new(signing_key);
        let producer = LogProducer::new(&settings.kafka).context("creating the producer")?;
        // One consumer reads every partition this instance owns, each into its own queue:
        // one fetch request serves them all, however many partitions there are. It starts
        // where each partition ends now; each owner reads what is before through a history
        // reader of its own (see KafkaPartition).
        let kafka = &settings.kafka;
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
            PartitionReader::open_many(&settings.kafka, &partitions)
                .context("opening the partition readers")?
                .into_iter()
                .map(|r| (TopicPartition::new(r.topic(), r.partition()), r))
                .collect();
        let owner_settings = OwnerSettings {
            instance: settings.instance.clone(),
            signing_key,
            policy: Arc::new(policy),
            timeout: settings.kafka.timeout,
            partitions: settings.kafka.partitions,
            key_retention: settings.idempotency_retention,
        };
        let Started {
            owners,
            statuses,
            tasks,
        } = Owners::start(&owner_settings, |stream_type, partition| {
            let at = TopicPartition::new(kafka.topic(stream_type), partition);
            let reader = readers
                .remove(&at)
                .with_context(|| format!("no reader for {at}"))?;
            Ok(KafkaPartition::new(producer.clone(), reader, kafka))
        })?;
        let listener = TcpListener::bind(settings.addr)
            .await
            .with_context(|| format!("binding {}", settings.addr))?;
        let state = AppState {
            owners: Arc::new(owners),
            statuses: Arc::new(statuses),
            partitions: settings.kafka.partitions,
            request_timeout: settings.request_timeout,
        };
        Ok(Self {
            listener,
            state,
            edge,
            edge_settings: settings.edge,
            tasks,
        })
    }

    /// The address the listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until Ctrl-C or SIGTERM; then stops accepting, lets in-flight commands
    /// finish, and stops the partition owners.
    pub async fn run_until_stopped(mut self) -> anyhow::Result<()> {
        info!(
            addr = %self.local_addr()?,
            tls = self.edge_settings.tls.is_some(),
            auth = self.edge_settings.auth.is_some(),
            "command API listening"
        );
        let router = app(self.state.clone(), &self.edge);
        drop(self.state);
        keel_http::serve(
            self.listener,
            router,
            &self.edge_settings,
            keel_telemetry::shutdown_signal(),
        )
        .await
        .context("serving HTTP")?;
        // The router, and with it every sender, is gone: the owners finish and return.
        while self.tasks.join_next().await.is_some() {}
        info!("stopped");
        Ok(())
    }
}
