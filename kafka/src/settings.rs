use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;

use crate::KafkaError;

/// Prefix of environment variables passed through to the Kafka client: `KEEL_KAFKA_SASL_MECHANISM`
/// becomes `sasl.mechanism`, `KEEL_KAFKA_SECURITY_PROTOCOL` becomes `security.protocol`.
const PASSTHROUGH: &str = "KEEL_KAFKA_";

/// How Keel reaches Kafka and names its topics.
#[derive(Clone)]
pub struct KafkaSettings {
    /// `KEEL_KAFKA_BROKERS`: bootstrap servers (default `127.0.0.1:9092`).
    pub brokers: String,
    /// `KEEL_TOPIC_PREFIX`: topics are `<prefix>.<aggregate>.events` (default `keel`).
    pub topic_prefix: String,
    /// `KEEL_PARTITIONS`: partitions of each topic (default 8).
    pub partitions: i32,
    /// `KEEL_REPLICATION_FACTOR`: replicas of each topic (default 1).
    pub replication_factor: i32,
    /// `KEEL_KAFKA_TIMEOUT_MS`: how long one produce or admin call may take (default 30 s).
    pub timeout: Duration,
    /// Further client properties from `KEEL_KAFKA_*` (SASL, TLS…), passed through as they are.
    pub client: BTreeMap<String, String>,
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Passed-through properties can hold passwords: print their names only.
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("timeout", &self.timeout)
            .field("client", &self.client.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: "keel".into(),
            partitions: 8,
            replication_factor: 1,
            timeout: Duration::from_secs(30),
            client: BTreeMap::new(),
        }
    }
}

fn parse<T: std::str::FromStr>(
    name: &str,
    value: String,
    check: impl Fn(&T) -> bool,
    hint: &str,
) -> Result<T, KafkaError> {
    value
        .parse()
        .ok()
        .filter(|v| check(v))
        .ok_or_else(|| KafkaError::Setting {
            name: name.into(),
            reason: format!("{value:?} is not {hint}"),
        })
}

/// The Kafka options of a binary, each also read from its environment variable. Further
/// client properties come from `KEEL_KAFKA_<PROPERTY>` variables (`KEEL_KAFKA_SASL_MECHANISM`
/// is `sasl.mechanism`), passed through as they are. A variable of these options set to
/// the empty string is an error, as a value is needed.
#[derive(Clone, Debug, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated [default: 127.0.0.1:9092].
    #[arg(
        long = "kafka-brokers",
        env = "KEEL_KAFKA_BROKERS",
        value_name = "HOST:PORT,..."
    )]
    pub brokers: Option<String>,
    /// Topics are <prefix>.<aggregate>.events: letters, digits, '.', '_' and '-' [default: keel].
    #[arg(long, env = "KEEL_TOPIC_PREFIX", value_name = "PREFIX")]
    pub topic_prefix: Option<String>,
    /// Partitions of each topic, 1 to 10000, the same for every process of one system
    /// [default: 8].
    #[arg(long, env = "KEEL_PARTITIONS", value_name = "N")]
    pub partitions: Option<String>,
    /// Replicas of each topic Keel creates [default: 1].
    #[arg(long, env = "KEEL_REPLICATION_FACTOR", value_name = "N")]
    pub replication_factor: Option<String>,
    /// How long one produce, read or admin call may take, in milliseconds, at least 100
    /// [default: 30000].
    #[arg(
        long = "kafka-timeout-ms",
        env = "KEEL_KAFKA_TIMEOUT_MS",
        value_name = "MS"
    )]
    pub timeout_ms: Option<String>,
}

impl KafkaArgs {
    /// The settings these options give, validated, with the client properties of the
    /// environment's other `KEEL_KAFKA_*` variables.
    pub fn settings(&self) -> Result<KafkaSettings, KafkaError> {
        let own = [
            ("KEEL_KAFKA_BROKERS", &self.brokers),
            ("KEEL_TOPIC_PREFIX", &self.topic_prefix),
            ("KEEL_PARTITIONS", &self.partitions),
            ("KEEL_REPLICATION_FACTOR", &self.replication_factor),
            ("KEEL_KAFKA_TIMEOUT_MS", &self.timeout_ms),
        ];
        let mut vars: Vec<(String, String)> = std::env::vars()
            .filter(|(name, _)| {
                name.starts_with(PASSTHROUGH) && own.iter().all(|(own, _)| own != name)
            })
            .collect();
        for (name, value) in own {
            // Given, or set in the environment (an empty value is not taken as unset: it
            // is refused, as it always was).
            if let Some(value) = value.clone().or_else(|| std::env::var(name).ok()) {
                vars.push((name.to_owned(), value));
            }
        }
        KafkaSettings::from_vars(vars)
    }
}

impl KafkaSettings {
    /// Reads the settings from `vars`, as from the environment.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, KafkaError> {
        let mut settings = Self::default();
        for (name, value) in vars {
            match name.as_str() {
                "KEEL_KAFKA_BROKERS" => {
                    if value.trim().is_empty() {
                        return Err(KafkaError::Setting {
                            name,
                            reason: "must name at least one broker".into(),
                        });
                    }
                    settings.brokers = value;
                }
                "KEEL_TOPIC_PREFIX" => {
                    let valid = !value.is_empty()
                        && value.len() <= 200
                        && value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
                    if !valid {
                        return Err(KafkaError::Setting {
                            name,
                            reason: format!(
                                "{value:?} may hold only letters, digits, '.', '_' and '-'"
                            ),
                        });
                    }
                    settings.topic_prefix = value;
                }
                "KEEL_PARTITIONS" => {
                    settings.partitions = parse(
                        &name,
                        value,
                        |n: &i32| (1..=10_000).contains(n),
                        "a partition count from 1 to 10000",
                    )?;
                }
                "KEEL_REPLICATION_FACTOR" => {
                    settings.replication_factor = parse(
                        &name,
                        value,
                        |n: &i32| *n >= 1,
                        "a replication factor of at least 1",
                    )?;
                }
                "KEEL_KAFKA_TIMEOUT_MS" => {
                    let ms: u64 = parse(
                        &name,
                        value,
                        |n: &u64| *n >= 100,
                        "a number of milliseconds, at least 100",
                    )?;
                    settings.timeout = Duration::from_millis(ms);
                }
                _ => {
                    if let Some(property) = name.strip_prefix(PASSTHROUGH) {
                        let property = property.to_ascii_lowercase().replace('_', ".");
                        settings.client.insert(property, value);
                    }
                }
            }
        }
        Ok(settings)
    }

    /// The topic of an aggregate type: `<prefix>.<aggregate>.events`.
    pub fn topic(&self, stream_type: &str) -> String {
        keel_schemas::topic_name(&self.topic_prefix, stream_type)
    }

    /// The topic of an aggregate's partition snapshots: `<prefix>.<aggregate>.snapshots`,
    /// compacted, partitioned as its events' topic.
    pub fn snapshot_topic(&self, stream_type: &str) -> String {
        format!("{}.{stream_type}.snapshots", self.topic_prefix)
    }

    /// A client configuration with the brokers and every passed-through property.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.client {
            config.set(key, value);
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn options_and_their_defaults_give_the_same_settings_as_the_environment() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            kafka: KafkaArgs,
        }
        let defaults = Cli::parse_from(["x"]).kafka.settings().unwrap();
        let from_env = KafkaSettings::from_vars(vec![]).unwrap();
        assert_eq!(
            (defaults.brokers, defaults.partitions, defaults.timeout),
            (from_env.brokers, from_env.partitions, from_env.timeout)
        );
        let given = Cli::parse_from(["x", "--partitions", "3", "--topic-prefix", "t"]);
        assert_eq!(
            given.kafka.settings().unwrap().topic("order"),
            "t.order.events"
        );
        let bad = Cli::parse_from(["x", "--partitions", "0"]).kafka.settings();
        assert!(bad.unwrap_err().to_string().contains("KEEL_PARTITIONS"));
    }

    #[test]
    fn defaults_run_the_embedded_stack() {
        let s = KafkaSettings::from_vars(vec![]).unwrap();
        assert_eq!(s.brokers, "127.0.0.1:9092");
        assert_eq!(s.partitions, 8);
        assert_eq!(s.topic("order"), "keel.order.events");
    }

    #[test]
    fn reads_and_validates_the_environment() {
        let s = KafkaSettings::from_vars(vars(&[
            ("KEEL_KAFKA_BROKERS", "k1:9092,k2:9092"),
            ("KEEL_TOPIC_PREFIX", "shop-test"),
            ("KEEL_PARTITIONS", "3"),
            ("KEEL_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KEEL_KAFKA_SASL_PASSWORD", "hunter2"),
        ]))
        .unwrap();
        assert_eq!(s.topic("product"), "shop-test.product.events");
        assert_eq!(s.partitions, 3);
        assert_eq!(s.client["security.protocol"], "SASL_SSL");
        assert!(!format!("{s:?}").contains("hunter2"), "secrets never print");
        for bad in [
            ("KEEL_PARTITIONS", "0"),
            ("KEEL_PARTITIONS", "x"),
            ("KEEL_TOPIC_PREFIX", "a b"),
            ("KEEL_KAFKA_BROKERS", " "),
        ] {
            let err = KafkaSettings::from_vars(vars(&[bad])).unwrap_err();
            assert!(err.to_string().contains(bad.0), "{err}");
        }
    }
}
