use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use keel_schemas::TopicPartition;
use serde_json::{Value, json};

use super::AppState;
use crate::error::ApiError;
use crate::owner::{Status, StatusCell};

/// `GET /healthz`: the process is alive.
pub(super) async fn alive() -> Json<Value> {
    Json(json!({"status": "alive"}))
}

/// Where one partition stands, as this instance sees it.
struct Standing {
    /// This instance's owner of it, if it runs one.
    here: Option<StatusCell>,
    /// The URL of the instance the group gave it to, if known.
    owner_url: Option<String>,
}

impl Standing {
    /// This instance serves the partition, or knows another instance that owns it.
    fn covered(&self, own_url: Option<&str>) -> bool {
        match (&self.here, &self.owner_url) {
            (Some(status), _) => status.get() == Status::Serving,
            (None, Some(url)) => Some(url.as_str()) != own_url,
            (None, None) => false,
        }
    }

    fn json(&self, topic: &str, partition: i32) -> Value {
        let mut entry = json!({
            "topic": topic,
            "partition": partition,
            "owner_url": self.owner_url,
        });
        if let Some(status) = &self.here {
            entry["status"] = json!(status.get().as_str());
            entry["writer"] = json!(status.writer());
            entry["epoch"] = json!(status.epoch());
            entry["started_from_snapshot_at"] = json!(status.started_from());
        } else {
            entry["status"] = json!(if self.owner_url.is_some() {
                "elsewhere"
            } else {
                "unowned"
            });
        }
        entry
    }
}

fn standings(state: &AppState) -> Vec<(String, i32, Standing)> {
    let here = state.owners.statuses();
    state
        .every_partition()
        .into_iter()
        .map(|(_, at)| {
            let status = here
                .iter()
                .find(|s| s.topic == at.topic && s.partition == at.partition)
                .cloned();
            let owner_url = match &state.cluster {
                Some(cluster) => cluster.owner_of(&at),
                None => status.as_ref().map(|_| String::new()),
            };
            let standing = Standing {
                here: status,
                owner_url: owner_url.filter(|u| !u.is_empty()),
            };
            (at.topic, at.partition, standing)
        })
        .collect()
}

/// Partitions no instance serves, as this instance sees the group: neither its own owner
/// nor another member that says it serves the partition (in the `/owned` each member
/// publishes). Every instance sees the same, whichever is asked.
pub(crate) fn unserved_partitions(state: &AppState) -> usize {
    let here = state.owners.statuses();
    state
        .every_partition()
        .into_iter()
        .filter(|(_, at)| {
            let serving_here = here.iter().any(|s| {
                s.topic == at.topic && s.partition == at.partition && s.get() == Status::Serving
            });
            let serving_elsewhere = state.cluster.as_ref().is_some_and(|cluster| {
                cluster
                    .served_by(at)
                    .is_some_and(|url| url != cluster.url())
            });
            !serving_here && !serving_elsewhere
        })
        .count()
}

/// `GET /readyz`: 200 when this instance takes commands for every partition: it serves
/// each one it owns, and knows which instance owns each of the others; 503 with the
/// partitions it cannot take commands for otherwise.
pub(super) async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let own_url = state.cluster.as_ref().map(|c| c.url().to_owned());
    let all = standings(&state);
    let owned = all.iter().filter(|(_, _, s)| s.here.is_some()).count();
    let not_covered: Vec<Value> = all
        .iter()
        .filter(|(_, _, s)| !s.covered(own_url.as_deref()))
        .map(|(topic, partition, s)| s.json(topic, *partition))
        .collect();
    if not_covered.is_empty() {
        (
            StatusCode::OK,
            Json(json!({"status": "ready", "partitions": all.len(), "owned": owned})),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "not_serving": not_covered})),
        )
    }
}

/// `GET /v1/partitions` (role `admin`): every partition with its owner as this instance
/// sees it (this instance's own with their writer, epoch and state), and the group.
pub(super) async fn partitions(State(state): State<AppState>) -> Json<Value> {
    let partitions: Vec<Value> = standings(&state)
        .iter()
        .map(|(topic, partition, s)| s.json(topic, *partition))
        .collect();
    let group = state.cluster.as_ref().map(|cluster| {
        let (view, age, error) = cluster.view();
        json!({
            "id": cluster.group(),
            "state": view.as_ref().map(|v| v.state.clone()),
            "members": view.as_ref().map(|v| v.members.iter().map(|m| json!({
                "url": m.url,
                "member_id": m.member_id,
                "partitions": m.partitions.len(),
            })).collect::<Vec<_>>()),
            "seen_ms_ago": age.map(|a| a.as_millis()),
            "error": error,
            "assigned_here": cluster.assigned().len(),
        })
    });
    Json(json!({
        "instance": state.instance,
        "url": state.cluster.as_ref().map(|c| c.url().to_owned()),
        "assignment": if state.cluster.is_some() { "group" } else { "all" },
        "group": group,
        "partitions": partitions,
    }))
}

/// `GET /owned`: the partitions this instance serves, for the other instances of its group
/// to route commands by.
pub(super) async fn owned(State(state): State<AppState>) -> Json<crate::cluster::Owned> {
    let serving: Vec<(String, i32)> = state
        .owners
        .statuses()
        .into_iter()
        .filter(|s| s.get() == Status::Serving)
        .map(|s| (s.topic, s.partition))
        .collect();
    Json(match &state.cluster {
        Some(cluster) => cluster.owned(serving),
        None => crate::cluster::Owned {
            url: None,
            serving,
            at_ms: 0,
            signature: None,
        },
    })
}

/// `POST /handoff`: another member of the group, whose owner has read a partition the group
/// gave it and is about to fence, asks this instance to hand it over now. The body is that
/// member's signed [`HandoffAsk`](crate::cluster::HandoffAsk) naming the partitions (a
/// member as last seen, a trusted key, fresh). Only a partition the group took from this
/// instance is handed over (its owner
/// serves on, released, until asked or its handoff timeout): the answer lists those, once
/// each has answered what it took and left its handoff mark.
pub(super) async fn handoff(
    State(state): State<AppState>,
    Json(request): Json<crate::cluster::HandoffAsk>,
) -> Result<Json<Value>, ApiError> {
    let Some(cluster) = &state.cluster else {
        return Err(ApiError::NotFound {
            detail: "this instance is not one of a group".into(),
            rule: None,
        });
    };
    if !cluster.signed_for_here(&request) {
        return Err(ApiError::Forbidden(
            "a handoff request must be for this instance, signed lately by a key it trusts".into(),
        ));
    }
    // A member that joined moments ago may be missing from the view: read it again.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while !cluster.is_member(&request.from) && std::time::Instant::now() < until {
        cluster.refresh_soon();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    if !cluster.is_member(&request.from) {
        return Err(ApiError::Forbidden(
            "a handoff request must come from a member of the group".into(),
        ));
    }
    let mut handed_over = Vec::new();
    for (topic, partition) in request.partitions {
        let stream_type = keel_domain::STREAM_TYPES
            .iter()
            .find(|t| state.topic(t) == topic);
        let Some(stream_type) = stream_type else {
            continue;
        };
        // Commands for it go to the asker from now on: they wait in its owner's queue
        // while it fences, rather than here while the group's view catches up.
        let at = TopicPartition::new(topic.clone(), partition);
        cluster.note_moved(&at, &request.from);
        // On a task of its own: a caller that hangs up does not cut the handoff short.
        let (owners, within) = (std::sync::Arc::clone(&state.owners), state.request_timeout);
        let handed = tokio::spawn(async move {
            owners
                .hand_over_released(stream_type, partition, within)
                .await
        });
        if handed.await.unwrap_or(false) {
            handed_over.push(json!({"topic": topic, "partition": partition}));
        } else {
            cluster.forget_moved(&at, &request.from);
        }
    }
    if handed_over.is_empty() {
        return Err(ApiError::NotFound {
            detail: "this instance is not handing any of those partitions over".into(),
            rule: None,
        });
    }
    Ok(Json(json!({"handed_over": handed_over})))
}
