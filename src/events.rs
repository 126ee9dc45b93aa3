//! Events that every `kubectl` view sorts correctly.
//!
//! kube's `Recorder` writes `events.k8s.io/v1` Events, which carry only `eventTime`: the API server
//! refuses `deprecatedLastTimestamp` on that API, so `kubectl get events --sort-by=.lastTimestamp`
//! (the sort most people type) put our events in no useful order. This recorder writes the same
//! events through the core `v1` API, which takes both: `eventTime`, `reportingComponent` and
//! `reportingInstance` as the new API sets them, and `firstTimestamp` / `lastTimestamp` / `count` as
//! the old one does (read back as `deprecated*` through `events.k8s.io/v1`). It takes kube's
//! [`Event`] and [`Reporter`], so call sites read as before. A repeat of the same event (same object,
//! type, reason, action and note) within [`CACHE_TTL`] patches the count and last timestamp of the
//! first instead of adding another object, as kube's recorder and client-go's do.
//!
//! For that it remembers, per event, a hash of what makes it the same and the little a repeat
//! needs (its name, count and times), not the event: at 10,000 connections the cached events were
//! most of the operator's memory growth during a cold start.

use k8s_openapi::{
    api::core::v1::{Event as CoreEvent, EventSeries, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    runtime::events::{Event, EventType, Reporter},
};
use serde_json::json;
use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    sync::{Arc, Mutex},
};

/// How long a published event is remembered for aggregation (kube's recorder uses the same).
pub const CACHE_TTL: SignedDuration = SignedDuration::from_mins(6);

/// How often expired entries are dropped (a lookup ignores them anyway).
const SWEEP_EVERY: SignedDuration = SignedDuration::from_mins(1);

fn type_name(t: EventType) -> &'static str {
    match t {
        EventType::Normal => "Normal",
        EventType::Warning => "Warning",
    }
}

/// The hash of what makes two events the same one, repeated: the object, type, reason, action and
/// note (64 bits: a collision among the few thousand events of six minutes would only add to
/// another event's count). Hashed in place, nothing copied.
fn key(ev: &Event, regarding: &ObjectReference) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    (
        &regarding.namespace,
        &regarding.kind,
        &regarding.name,
        &regarding.uid,
    )
        .hash(&mut hasher);
    (type_name(ev.type_), &ev.reason, &ev.action, &ev.note).hash(&mut hasher);
    hasher.finish()
}

/// What is remembered of a published event: what its repeat needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    name: String,
    count: i32,
    first: Timestamp,
    last: Timestamp,
}

impl Seen {
    fn of(event: &CoreEvent) -> Option<Seen> {
        Some(Seen {
            name: event.metadata.name.clone()?,
            count: event.count.unwrap_or(1),
            first: event.first_timestamp.as_ref()?.0,
            last: event.last_timestamp.as_ref()?.0,
        })
    }
}

/// The event to write at `now`: a new one, or the repeat of `previous` (the same event, published
/// before: same name and first time) with its count and last timestamp advanced. Pure.
pub fn next(
    previous: Option<&Seen>,
    ev: &Event,
    regarding: &ObjectReference,
    reporter: &Reporter,
    now: Timestamp,
) -> CoreEvent {
    let instance = reporter
        .instance
        .clone()
        .unwrap_or_else(|| reporter.controller.clone());
    let mut event = CoreEvent {
        metadata: ObjectMeta {
            namespace: Some(regarding.namespace.clone().unwrap_or_else(|| "default".into())),
            name: Some(format!(
                "{}.{:x}",
                regarding.name.as_deref().unwrap_or(&reporter.controller),
                now.as_nanosecond()
            )),
            ..ObjectMeta::default()
        },
        involved_object: regarding.clone(),
        type_: Some(type_name(ev.type_).into()),
        reason: Some(ev.reason.clone()),
        message: ev.note.clone(),
        action: Some(ev.action.clone()),
        related: ev.secondary.clone(),
        event_time: Some(MicroTime(now)),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        reporting_component: Some(reporter.controller.clone()),
        reporting_instance: Some(instance.clone()),
        source: Some(EventSource {
            component: Some(reporter.controller.clone()),
            host: None,
        }),
        series: None,
    };
    if let Some(prev) = previous {
        let count = prev.count + 1;
        event.metadata.name = Some(prev.name.clone());
        event.event_time = Some(MicroTime(prev.first));
        event.first_timestamp = Some(Time(prev.first));
        event.count = Some(count);
        event.series = Some(EventSeries {
            count: Some(count),
            last_observed_time: Some(MicroTime(now)),
        });
    }
    event
}

/// The events published within [`CACHE_TTL`], by [`key`].
#[derive(Default)]
struct Cache {
    seen: HashMap<u64, Seen>,
    next_sweep: Option<Timestamp>,
}

impl Cache {
    /// The same event published within the TTL, after dropping expired entries (once a minute).
    fn previous(&mut self, key: u64, now: Timestamp) -> Option<&Seen> {
        if self.next_sweep.is_none_or(|at| now >= at) {
            self.seen.retain(|_, s| s.last + CACHE_TTL > now);
            self.next_sweep = Some(now + SWEEP_EVERY);
        }
        self.seen.get(&key).filter(|s| s.last + CACHE_TTL > now)
    }
}

/// Publishes events; cheap to clone (the aggregation cache is shared).
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    reporter: Reporter,
    cache: Arc<Mutex<Cache>>,
}

impl Recorder {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            cache: Arc::default(),
        }
    }

    /// Publishes `ev` about `regarding` (events of cluster-scoped objects go to `default`).
    pub async fn publish(&self, ev: &Event, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = key(ev, regarding);
        // The cache is locked only to read and to record, never across the API call: every
        // reconcile publishes through this one recorder. (Two publishers of the same event at the
        // same moment may both create it: a duplicate line, as with kube's recorder.)
        let event = {
            let mut cache = self.cache.lock().unwrap();
            next(cache.previous(key, now), ev, regarding, &self.reporter, now)
        };
        let events: Api<CoreEvent> = Api::namespaced(
            self.client.clone(),
            event.metadata.namespace.as_deref().unwrap_or("default"),
        );
        let name = event.metadata.name.clone().unwrap_or_default();
        let written = if event.count.unwrap_or(1) > 1 {
            let patch = json!({
                "count": event.count,
                "lastTimestamp": event.last_timestamp,
                "series": event.series,
            });
            match events
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                // Deleted meanwhile (an event's life is short): start a new one.
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    let fresh = next(None, ev, regarding, &self.reporter, now);
                    events.create(&PostParams::default(), &fresh).await.map(|_| fresh)
                }
                other => other.map(|_| event),
            }
        } else {
            events.create(&PostParams::default(), &event).await.map(|_| event)
        };
        let mut cache = self.cache.lock().unwrap();
        match written {
            Ok(event) => {
                if let Some(seen) = Seen::of(&event) {
                    cache.seen.insert(key, seen);
                }
                Ok(())
            }
            Err(e) => {
                cache.seen.remove(&key);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reporter() -> Reporter {
        Reporter {
            controller: "connection-operator".into(),
            instance: Some("pod-1".into()),
        }
    }

    fn regarding() -> ObjectReference {
        ObjectReference {
            api_version: Some("crmconnect.io/v1alpha1".into()),
            kind: Some("Connection".into()),
            name: Some("acme".into()),
            namespace: Some("team-a".into()),
            uid: Some("u1".into()),
            ..ObjectReference::default()
        }
    }

    fn event(note: &str) -> Event {
        Event {
            type_: EventType::Warning,
            reason: "Deactivated".into(),
            note: Some(note.into()),
            action: "Reconcile".into(),
            secondary: None,
        }
    }

    #[test]
    fn a_new_event_has_every_timestamp_the_two_apis_sort_on() {
        let now: Timestamp = "2026-11-28T10:00:00Z".parse().unwrap();
        let e = next(None, &event("revoked"), &regarding(), &reporter(), now);
        assert_eq!(e.event_time, Some(MicroTime(now)));
        assert_eq!(e.first_timestamp, Some(Time(now)));
        assert_eq!(e.last_timestamp, Some(Time(now)));
        assert_eq!(e.count, Some(1));
        assert_eq!(e.metadata.namespace.as_deref(), Some("team-a"));
        assert!(e.metadata.name.as_deref().unwrap().starts_with("acme."));
        assert_eq!(e.reporting_component.as_deref(), Some("connection-operator"));
        assert_eq!(e.reporting_instance.as_deref(), Some("pod-1"));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.message.as_deref(), Some("revoked"));
        assert!(e.series.is_none());
    }

    #[test]
    fn a_repeat_advances_count_and_last_timestamp_only() {
        let t0: Timestamp = "2026-11-28T10:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-11-28T10:01:00Z".parse().unwrap();
        let first = next(None, &event("revoked"), &regarding(), &reporter(), t0);
        let seen = Seen::of(&first).unwrap();
        let second = next(Some(&seen), &event("revoked"), &regarding(), &reporter(), t1);
        assert_eq!(second.metadata.name, first.metadata.name);
        assert_eq!(second.first_timestamp, Some(Time(t0)));
        assert_eq!(second.event_time, Some(MicroTime(t0)));
        assert_eq!(second.last_timestamp, Some(Time(t1)));
        assert_eq!(second.count, Some(2));
        assert_eq!(second.series.as_ref().unwrap().count, Some(2));
    }

    #[test]
    fn another_note_is_another_event() {
        assert_ne!(key(&event("a"), &regarding()), key(&event("b"), &regarding()));
        assert_eq!(key(&event("a"), &regarding()), key(&event("a"), &regarding()));
    }

    #[test]
    fn a_repeat_after_the_ttl_is_a_new_event_and_expired_entries_go() {
        let t0: Timestamp = "2026-11-28T10:00:00Z".parse().unwrap();
        let mut cache = Cache::default();
        let first = next(None, &event("revoked"), &regarding(), &reporter(), t0);
        let k = key(&event("revoked"), &regarding());
        cache.seen.insert(k, Seen::of(&first).unwrap());
        let within = t0 + CACHE_TTL - SignedDuration::from_secs(1);
        assert_eq!(cache.previous(k, within).map(|s| s.count), Some(1));
        // Past the TTL: not a repeat, even before the next sweep drops it.
        assert!(cache.previous(k, t0 + CACHE_TTL).is_none());
        let later = t0 + CACHE_TTL + SWEEP_EVERY;
        assert!(cache.previous(k, later).is_none());
        assert!(cache.seen.is_empty());
    }

    #[test]
    fn events_of_cluster_scoped_objects_go_to_default() {
        let mut r = regarding();
        r.namespace = None;
        let e = next(None, &event("x"), &r, &reporter(), Timestamp::now());
        assert_eq!(e.metadata.namespace.as_deref(), Some("default"));
    }
}
