use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keel_views::ProjectionSpec;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::projection::{ProjectedEvent, Projection, execute_script, table};

/// Every event of every topic with its full commit metadata, position and hashes.
pub struct AuditLog;

#[async_trait]
impl Projection for AuditLog {
    fn spec(&self) -> &'static ProjectionSpec {
        &keel_views::AUDIT_LOG
    }

    async fn create(&self, db: &mut PgConnection, generation: i32) -> Result<(), sqlx::Error> {
        let t = table("audit_log", generation);
        execute_script(db, &format!(
            r#"CREATE TABLE IF NOT EXISTS {t} (
                topic text NOT NULL, partition integer NOT NULL, "offset" bigint NOT NULL, index integer NOT NULL,
                stream_type text NOT NULL, stream_id text NOT NULL, version bigint NOT NULL,
                event_type text NOT NULL, schema_version integer NOT NULL, payload jsonb NOT NULL,
                event_id uuid NOT NULL, commit_id uuid NOT NULL, command_id uuid NOT NULL, command_type text NOT NULL,
                actor text NOT NULL, idempotency_key text, correlation_id text NOT NULL, causation_id text,
                recorded_at timestamptz NOT NULL, writer_instance text NOT NULL, writer_epoch bigint NOT NULL,
                prev_hash text, hash text NOT NULL, signature_key_id text, signature text,
                PRIMARY KEY (topic, partition, "offset", index));"#
        ))
        .await
    }

    fn indexes(&self, generation: i32) -> Vec<String> {
        let t = table("audit_log", generation);
        vec![
            format!(
                "CREATE INDEX IF NOT EXISTS {t}_stream ON {t} (stream_type, stream_id, version)"
            ),
            format!("CREATE INDEX IF NOT EXISTS {t}_recorded ON {t} (recorded_at)"),
            format!("CREATE INDEX IF NOT EXISTS {t}_actor ON {t} (actor, recorded_at)"),
            format!("CREATE INDEX IF NOT EXISTS {t}_type ON {t} (event_type, recorded_at)"),
        ]
    }

    async fn apply(
        &self,
        db: &mut PgConnection,
        generation: i32,
        events: &[ProjectedEvent],
    ) -> Result<(), sqlx::Error> {
        if events.is_empty() {
            return Ok(());
        }
        let n = events.len();
        let mut topic = Vec::with_capacity(n);
        let mut partition = Vec::with_capacity(n);
        let mut offset = Vec::with_capacity(n);
        let mut index = Vec::with_capacity(n);
        let mut stream_type = Vec::with_capacity(n);
        let mut stream_id = Vec::with_capacity(n);
        let mut version = Vec::with_capacity(n);
        let mut event_type = Vec::with_capacity(n);
        let mut schema_version = Vec::with_capacity(n);
        let mut payload: Vec<Value> = Vec::with_capacity(n);
        let mut event_id: Vec<Uuid> = Vec::with_capacity(n);
        let mut commit_id: Vec<Uuid> = Vec::with_capacity(n);
        let mut command_id: Vec<Uuid> = Vec::with_capacity(n);
        let mut command_type = Vec::with_capacity(n);
        let mut actor = Vec::with_capacity(n);
        let mut idempotency_key: Vec<Option<String>> = Vec::with_capacity(n);
        let mut correlation_id = Vec::with_capacity(n);
        let mut causation_id: Vec<Option<String>> = Vec::with_capacity(n);
        let mut recorded_at: Vec<DateTime<Utc>> = Vec::with_capacity(n);
        let mut writer_instance = Vec::with_capacity(n);
        let mut writer_epoch = Vec::with_capacity(n);
        let mut prev_hash: Vec<Option<String>> = Vec::with_capacity(n);
        let mut hash = Vec::with_capacity(n);
        let mut signature_key_id: Vec<Option<String>> = Vec::with_capacity(n);
        let mut signature: Vec<Option<String>> = Vec::with_capacity(n);
        for e in events {
            let c = &e.commit;
            let env = e.envelope();
            topic.push(e.topic.clone());
            partition.push(e.partition);
            offset.push(e.offset);
            index.push(e.index as i32);
            stream_type.push(c.stream.stream_type.clone());
            stream_id.push(c.stream.id.clone());
            version.push(env.version as i64);
            event_type.push(env.event_type.clone());
            schema_version.push(env.schema_version as i32);
            payload.push(env.payload.clone());
            event_id.push(env.event_id);
            commit_id.push(c.commit_id);
            command_id.push(c.command.id);
            command_type.push(c.command.command_type.clone());
            actor.push(c.command.actor.clone());
            idempotency_key.push(c.command.idempotency_key.clone());
            correlation_id.push(c.command.correlation_id.clone());
            causation_id.push(c.command.causation_id.clone());
            recorded_at.push(c.recorded_at.as_datetime());
            writer_instance.push(c.writer.instance.clone());
            writer_epoch.push(c.writer.epoch as i64);
            prev_hash.push(c.prev_hash.clone());
            hash.push(c.hash.clone());
            signature_key_id.push(c.signature.as_ref().map(|s| s.key_id.clone()));
            signature.push(c.signature.as_ref().map(|s| s.value.clone()));
        }
        let t = table("audit_log", generation);
        sqlx::query(&format!(
            r#"INSERT INTO {t} (topic, partition, "offset", index, stream_type, stream_id, version, event_type,
                schema_version, payload, event_id, commit_id, command_id, command_type, actor, idempotency_key,
                correlation_id, causation_id, recorded_at, writer_instance, writer_epoch, prev_hash, hash,
                signature_key_id, signature)
            SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[], $4::int[], $5::text[], $6::text[], $7::bigint[],
                $8::text[], $9::int[], $10::jsonb[], $11::uuid[], $12::uuid[], $13::uuid[], $14::text[], $15::text[],
                $16::text[], $17::text[], $18::text[], $19::timestamptz[], $20::text[], $21::bigint[], $22::text[], $23::text[],
                $24::text[], $25::text[])"#
        ))
        .bind(topic)
        .bind(partition)
        .bind(offset)
        .bind(index)
        .bind(stream_type)
        .bind(stream_id)
        .bind(version)
        .bind(event_type)
        .bind(schema_version)
        .bind(payload)
        .bind(event_id)
        .bind(commit_id)
        .bind(command_id)
        .bind(command_type)
        .bind(actor)
        .bind(idempotency_key)
        .bind(correlation_id)
        .bind(causation_id)
        .bind(recorded_at)
        .bind(writer_instance)
        .bind(writer_epoch)
        .bind(prev_hash)
        .bind(hash)
        .bind(signature_key_id)
        .bind(signature)
        .execute(db)
        .await?;
        Ok(())
    }
}
