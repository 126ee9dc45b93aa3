//! What the controller knows of every connection, keyed by UID, with the reverse lookups its
//! watches need: which connections use a credentials Secret, which hold or wait for an org. Kept
//! from the Connection watch's events (no scan of the cache per event or per reconcile), and
//! holding each connection's memory between reconciles (its last validation, a rotated token not
//! yet saved, failure counts): an entry goes when its connection is deleted, so nothing needs a
//! periodic sweep. In memory only, no I/O: unit-tested below.

use super::cached::CachedConnection;
use super::claims::{self, Claimant};
use super::{object_ref, schedule, tokens};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// How many of a connection's own writes are remembered (a reconcile makes at most four).
const OWN_WRITES_KEPT: usize = 4;

/// What [`Writing::wrote`] keeps of a resourceVersion: a 64-bit hash, never 0 (0 is "none").
fn version_key(resource_version: &str) -> u64 {
    use std::hash::Hasher;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    hasher.write(resource_version.as_bytes());
    hasher.finish() | 1
}

/// What the operator remembers of one connection between reconciles.
#[derive(Clone, Debug, Default)]
pub struct Memory {
    /// Its last validation (seeded from its status and session Secret after a restart).
    pub memo: Option<schedule::Memo>,
    /// A rotated refresh token not yet saved to `<name>-token` (also in the journal, when there
    /// is one). Boxed, as it is rare: 8 bytes instead of 120 in every connection's entry.
    pub pending: Option<Box<tokens::Pending>>,
    /// The OrgClaim as this connection's release wrote it (held: false), while Inactive: its
    /// re-authorization holds it again with a write conditional on that version, without reading
    /// it first (any change since makes the write fail, and the claim is read). Boxed, as it is
    /// rare (see `pending`).
    pub released_claim: Option<Box<crate::api::OrgClaim>>,
    /// Consecutive looks for a credentials Secret the watch cannot see.
    pub secret_polls: u32,
    /// When it was last revalidated because its retriever was down.
    pub retriever_revalidated: Option<Timestamp>,
    /// Consecutive failed reconciles (API errors), for the backoff.
    pub failures: u32,
    /// Its last writes of its own children (see [`Index::writing`]): hashes of the resourceVersions
    /// the API server returned (an array: no allocation per connection), 0 for none yet.
    own_writes: [u64; OWN_WRITES_KEPT],
    /// Writes of its children sent and not answered yet (see [`Index::writing`]).
    in_flight: u8,
    /// Events of its children that came while writes were in flight, not known as its own: hashed
    /// resourceVersions, decided when the last of those writes is answered.
    unsettled: Vec<u64>,
}

/// What the lookups need of a Connection. Shared strings: the reverse maps' keys are the same
/// allocations.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Facts {
    namespace: Arc<str>,
    name: Arc<str>,
    /// `spec.credentialsSecretRef.name`.
    secret: Arc<str>,
    /// `status.remoteId`.
    remote_id: Option<Arc<str>>,
    /// The org key of that ID (the name of its OrgSettings).
    org_key: Option<Arc<str>>,
    /// Set when it waits for its org (in Conflict). Boxed, as it is rare (see `Memory::pending`).
    waiting: Option<Box<Claimant>>,
}

impl Facts {
    fn of(guard: &DeserializeGuard<CachedConnection>) -> Option<Facts> {
        let conn = guard.0.as_ref().ok()?;
        let remote_id = conn.remote_id();
        Some(Facts {
            namespace: conn.metadata.namespace.as_deref()?.into(),
            name: conn.metadata.name.as_deref().unwrap_or_default().into(),
            secret: conn.spec.credentials_secret_ref.name.as_str().into(),
            org_key: remote_id
                .and_then(|id| crate::api::org_key(conn.spec.provider, id))
                .map(Arc::from),
            remote_id: remote_id.map(Arc::from),
            // Rare (in Conflict only): the Connection is rebuilt only then.
            waiting: (conn.state() == Some(crate::api::State::Conflict))
                .then(|| claims::waiting_claimant(&conn.to_connection()).map(Box::new))
                .flatten(),
        })
    }

    fn object_ref(&self) -> ObjectRef<DeserializeGuard<CachedConnection>> {
        object_ref(&self.namespace, &self.name)
    }
}

#[derive(Default)]
struct Entry {
    /// `None` until the watch has seen the connection (a token replayed from the journal at
    /// start comes first).
    facts: Option<Facts>,
    memory: Memory,
    /// The [`state::digest`] of its whole status, as last seen or written: the cache keeps only
    /// a slim status ([`state::slim_status`]).
    status: Option<u64>,
    /// When its next recheck is due, in [`Index::tick`]s; 0 for none (see [`Index::recheck_in`]).
    recheck: u64,
}

/// The connections at one key of a reverse map.
type Uids = Vec<Arc<str>>;

#[derive(Default)]
struct Inner {
    /// Boxed: an `Entry` is 432 bytes, and a map grows by doubling its buckets, each the size of
    /// its value (at 10,000 connections 16,384 of them: 7 MiB inline, 10 MiB while it grew).
    /// The UID is shared with the reverse maps' values.
    entries: HashMap<Arc<str>, Box<Entry>>,
    /// (namespace, Secret name) → UIDs. A `Vec`: almost every key has one UID, and a one-element
    /// `BTreeSet` allocates a whole node (280 bytes; 8 MiB of 10,000 connections' three maps).
    by_secret: HashMap<(Arc<str>, Arc<str>), Uids>,
    /// Org ID → UIDs.
    by_remote: HashMap<Arc<str>, Uids>,
    /// Org key → UIDs.
    by_org_key: HashMap<Arc<str>, Uids>,
    /// Watches (one per scope) that have not finished their first list.
    unlisted: usize,
    /// The rechecks to come, by due tick (see [`Index::recheck_in`]): ~50 bytes a connection and
    /// no allocation of its own, where kube's scheduler keeps two copies of the connection's
    /// `ObjectRef` (eight strings), a hash-map bucket and a `DelayQueue` slot.
    rechecks: BTreeSet<(u64, Arc<str>)>,
}

impl Inner {
    fn unlink(&mut self, uid: &str, facts: &Facts) {
        if let Some(remote) = &facts.remote_id {
            drop_uid(&mut self.by_remote, remote, uid);
        }
        if let Some(key) = &facts.org_key {
            drop_uid(&mut self.by_org_key, key, uid);
        }
        let secret = (facts.namespace.clone(), facts.secret.clone());
        drop_uid(&mut self.by_secret, &secret, uid);
    }

    fn link(&mut self, uid: &Arc<str>, facts: &Facts) {
        if let Some(remote) = &facts.remote_id {
            add_uid(&mut self.by_remote, remote.clone(), uid);
        }
        if let Some(key) = &facts.org_key {
            add_uid(&mut self.by_org_key, key.clone(), uid);
        }
        add_uid(
            &mut self.by_secret,
            (facts.namespace.clone(), facts.secret.clone()),
            uid,
        );
    }

    fn upsert(&mut self, uid: &str, facts: Facts) {
        let (uid, entry) = self.entry(uid);
        if entry.facts.as_ref() == Some(&facts) {
            return;
        }
        let old = entry.facts.replace(facts.clone());
        if let Some(old) = old {
            self.unlink(&uid, &old);
        }
        self.link(&uid, &facts);
    }

    /// The entry of `uid` (added when absent), and its shared key.
    fn entry(&mut self, uid: &str) -> (Arc<str>, &mut Entry) {
        let key = match self.entries.get_key_value(uid) {
            Some((key, _)) => key.clone(),
            None => {
                let key: Arc<str> = Arc::from(uid);
                self.entries.insert(key.clone(), Box::default());
                key
            }
        };
        let entry = self.entries.get_mut(uid).expect("just found or added");
        (key, entry)
    }

    fn remove(&mut self, uid: &str) {
        let Some((key, entry)) = self.entries.remove_entry(uid) else {
            return;
        };
        if entry.recheck != 0 {
            self.rechecks.remove(&(entry.recheck, key));
        }
        if let Some(facts) = entry.facts {
            self.unlink(uid, &facts);
        }
    }

    fn refs<'a>(&'a self, uids: Option<&'a Uids>) -> impl Iterator<Item = &'a Facts> + 'a {
        uids.into_iter()
            .flatten()
            .filter_map(|uid| self.entries.get(uid)?.facts.as_ref())
    }
}

/// Adds `uid` to the UIDs at `key` (once).
fn add_uid<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Uids>, key: K, uid: &Arc<str>) {
    let uids = map.entry(key).or_default();
    if !uids.iter().any(|u| u == uid) {
        uids.push(uid.clone());
    }
}

/// Removes `uid` from the UIDs at `key`, and the key once none is left.
fn drop_uid<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Uids>, key: &K, uid: &str) {
    if let Some(uids) = map.get_mut(key) {
        uids.retain(|u| &**u != uid);
        if uids.is_empty() {
            map.remove(key);
        }
    }
}

/// The index, shared by the controllers (one per watched namespace, or one for all).
pub struct Index {
    inner: Mutex<Inner>,
    /// Where a connection is sent to reconcile (a settled write, a recheck due): one channel per
    /// controller (its scope: a namespace, or all).
    wakes: Mutex<Vec<(Option<String>, Wake)>>,
    /// The origin of the rechecks' ticks (milliseconds since).
    origin: tokio::time::Instant,
    /// Told when a recheck is set earlier than the earliest one known (see [`Index::rechecks`]).
    earlier: tokio::sync::Notify,
}

/// A connection, as its controller names it.
type ConnectionRef = ObjectRef<DeserializeGuard<CachedConnection>>;

type Wake = futures::channel::mpsc::UnboundedSender<ConnectionRef>;

/// A write of a child of one connection, sent and not answered yet: its watch event may come
/// first (over HTTP/2 the answer and the event share a connection, and either task may run
/// first). An event of the connection's children that is not a known own write waits for the
/// answer instead of waking the connection at once; when the last such write is answered (or
/// fails, or is dropped), events that were not its writes wake the connection. So its own writes
/// never wake it, and no other change is missed.
#[must_use = "a write in flight is settled when this is dropped"]
pub struct Writing {
    index: Arc<Index>,
    uid: String,
}

impl Writing {
    /// The write was answered with `resource_version`: its watch event wakes no one.
    pub fn wrote(self, resource_version: Option<&str>) {
        if let Some(rv) = resource_version {
            self.index.remember_write(&self.uid, version_key(rv));
        }
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        self.index.settle(&self.uid);
    }
}

impl Index {
    /// An index fed by `watches` Connection watches (see [`Index::writer`]).
    pub fn new(watches: usize) -> Arc<Self> {
        Arc::new(Index {
            inner: Mutex::new(Inner {
                unlisted: watches,
                ..Default::default()
            }),
            wakes: Mutex::default(),
            origin: tokio::time::Instant::now(),
            earlier: tokio::sync::Notify::new(),
        })
    }

    /// The tick of `at`: milliseconds since the index was made, at least 1 (0 is "none").
    fn tick(&self, at: tokio::time::Instant) -> u64 {
        let ms = at.saturating_duration_since(self.origin).as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX).max(1)
    }

    /// The connection `uid` is checked again in `after` (replacing the recheck it had), or only
    /// when something changes (`None`). A connection the watch has not seen, or that is gone, is
    /// not kept. The reconciles' rechecks live here instead of in kube's scheduler
    /// (`Action::requeue`): the same wake, in a fraction of the memory ([`Inner::rechecks`]).
    pub fn recheck_in(&self, uid: &str, after: Option<std::time::Duration>) {
        let due = after.map_or(0, |d| self.tick(tokio::time::Instant::now() + d));
        let mut inner = self.inner.lock().unwrap();
        let Some(key) = inner.entries.get_key_value(uid).map(|(key, _)| key.clone()) else {
            return;
        };
        let entry = inner.entries.get_mut(uid).expect("just found");
        if entry.facts.is_none() || entry.recheck == due {
            return;
        }
        let old = std::mem::replace(&mut entry.recheck, due);
        if old != 0 {
            inner.rechecks.remove(&(old, key.clone()));
        }
        if due != 0 {
            let first = inner.rechecks.first().is_none_or(|(t, _)| due < *t);
            inner.rechecks.insert((due, key));
            if first {
                self.earlier.notify_one();
            }
        }
    }

    /// Takes the rechecks due at `now`, earliest first, and when the next one is.
    fn take_due(&self, now: tokio::time::Instant) -> (Vec<ConnectionRef>, Option<tokio::time::Instant>) {
        let now = self.tick(now);
        let mut inner = self.inner.lock().unwrap();
        let mut due = vec![];
        while let Some((tick, _)) = inner.rechecks.first()
            && *tick <= now
        {
            let (_, uid) = inner.rechecks.pop_first().expect("just seen");
            if let Some(entry) = inner.entries.get_mut(&uid) {
                entry.recheck = 0;
                if let Some(facts) = &entry.facts {
                    due.push(facts.object_ref());
                }
            }
        }
        let next = inner
            .rechecks
            .first()
            .map(|(tick, _)| self.origin + std::time::Duration::from_millis(*tick));
        (due, next)
    }

    /// Sends every recheck when it is due, to the controller of its namespace; runs until
    /// dropped. One task for all connections: it sleeps until the earliest recheck (or until one
    /// is set earlier).
    pub async fn rechecks(&self) {
        loop {
            let earlier = self.earlier.notified();
            let (due, next) = self.take_due(tokio::time::Instant::now());
            for object in due {
                self.wake(object);
            }
            match next {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = earlier => {}
                    }
                }
                None => earlier.await,
            }
        }
    }

    /// Sends the connection `object` to reconcile, to the controller whose scope holds its
    /// namespace (see [`Index::wakes`]).
    pub fn wake(&self, object: ConnectionRef) {
        for (scope, tx) in self.wakes.lock().unwrap().iter() {
            if scope.is_none() || scope.as_deref() == object.namespace.as_deref() {
                let _ = tx.unbounded_send(object.clone());
            }
        }
    }

    /// The connections of `scope` (a namespace, or all when `None`) that are woken ([`Index::wake`]:
    /// rivals, a settled write, a recheck due), for the controller's `reconcile_on`.
    pub fn wakes(
        &self,
        scope: Option<String>,
    ) -> futures::channel::mpsc::UnboundedReceiver<ObjectRef<DeserializeGuard<CachedConnection>>> {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        self.wakes.lock().unwrap().push((scope, tx));
        rx
    }

    /// The writer for the Connection watch of `scope` (a namespace, or all when `None`).
    pub fn writer(self: &Arc<Self>, scope: Option<String>) -> Writer {
        Writer {
            index: self.clone(),
            scope,
            listing: None,
            listed_once: false,
        }
    }

    /// Runs `f` on what is remembered of the connection `uid`. Once every watch has listed, only
    /// a connection the watch has seen keeps what `f` writes: a reconcile that ends after its
    /// connection was deleted leaves nothing behind.
    pub fn memory<R>(&self, uid: &str, f: impl FnOnce(&mut Memory) -> R) -> R {
        let mut inner = self.inner.lock().unwrap();
        let may_add = inner.unlisted > 0;
        match inner.entries.get_mut(uid) {
            Some(entry) => f(&mut entry.memory),
            None if may_add => f(&mut inner.entry(uid).1.memory),
            None => f(&mut Memory::default()),
        }
    }

    /// A write of a child of the connection `uid` (the session Secret, `<name>-token`, the
    /// retriever Deployment) is about to be sent: [`Writing::wrote`] with the resourceVersion the
    /// API server returns, so that the write's watch event wakes no one ([`Index::own_write`]).
    /// The last few writes are kept.
    pub fn writing(self: &Arc<Self>, uid: &str) -> Writing {
        self.memory(uid, |m| m.in_flight = m.in_flight.saturating_add(1));
        Writing {
            index: self.clone(),
            uid: uid.to_string(),
        }
    }

    fn remember_write(&self, uid: &str, written: u64) {
        self.memory(uid, |m| {
            m.own_writes.rotate_right(1);
            m.own_writes[0] = written;
        });
    }

    /// A write in flight was answered, failed or dropped: once none is left, the events that came
    /// meanwhile and were not its writes wake the connection.
    fn settle(&self, uid: &str) {
        let wake = {
            let mut inner = self.inner.lock().unwrap();
            let Some(entry) = inner.entries.get_mut(uid) else {
                return;
            };
            let m = &mut entry.memory;
            m.in_flight = m.in_flight.saturating_sub(1);
            if m.in_flight > 0 || m.unsettled.is_empty() {
                return;
            }
            let own = m.own_writes;
            let foreign = std::mem::take(&mut m.unsettled)
                .into_iter()
                .any(|seen| !own.contains(&seen));
            match &entry.facts {
                Some(facts) if foreign => facts.object_ref(),
                _ => return,
            }
        };
        self.wake(wake);
    }

    /// True when `child` (metadata from a watch) needs no reconcile of its owner now: it is, as
    /// seen, what this process wrote last (the owner's reconcile that wrote it knew everything it
    /// says), or it came while the owner had a write in flight, and is then decided when that
    /// write is answered (see [`Writing`]). Any later change (another writer, the Deployment's
    /// status) has a new resourceVersion and wakes the owner.
    pub fn own_write(&self, child: &kube::api::ObjectMeta) -> bool {
        let Some(rv) = child.resource_version.as_deref() else {
            return false;
        };
        let seen = version_key(rv);
        let mut inner = self.inner.lock().unwrap();
        let owners = child
            .owner_references
            .iter()
            .flatten()
            .filter(|o| o.controller == Some(true) && o.kind == "Connection");
        for owner in owners {
            let Some(entry) = inner.entries.get_mut(owner.uid.as_str()) else {
                continue;
            };
            let m = &mut entry.memory;
            if m.own_writes.contains(&seen) {
                return true;
            }
            if m.in_flight > 0 {
                m.unsettled.push(seen);
                return true;
            }
        }
        false
    }

    /// True when the status last seen or written for the connection `uid` has the [`state::digest`]
    /// `desired` (computed by the caller, outside the lock).
    pub fn status_is(&self, uid: &str, desired: u64) -> bool {
        let inner = self.inner.lock().unwrap();
        inner.entries.get(uid).and_then(|e| e.status) == Some(desired)
    }

    /// Remembers that a status with the [`state::digest`] `written` was written for the
    /// connection `uid` (its watch event, which follows, says the same).
    pub fn status_written(&self, uid: &str, written: u64) {
        if let Some(entry) = self.inner.lock().unwrap().entries.get_mut(uid) {
            entry.status = Some(written);
        }
    }

    /// The connections in `namespace` whose credentials are the Secret `name`.
    pub fn using_secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Vec<ObjectRef<DeserializeGuard<CachedConnection>>> {
        let inner = self.inner.lock().unwrap();
        let uids = inner.by_secret.get(&(Arc::from(namespace), Arc::from(name)));
        inner.refs(uids).map(Facts::object_ref).collect()
    }

    /// The connections in `namespace` of the org whose key is `org_key` (its OrgSettings' name).
    pub fn using_org(
        &self,
        namespace: &str,
        org_key: &str,
    ) -> Vec<ObjectRef<DeserializeGuard<CachedConnection>>> {
        let inner = self.inner.lock().unwrap();
        inner
            .refs(inner.by_org_key.get(org_key))
            .filter(|f| &*f.namespace == namespace)
            .map(Facts::object_ref)
            .collect()
    }

    /// The connections with the org ID `remote_id`, except `namespace/name`; in `namespace` only
    /// when `namespaced` (a namespaced install claims an org per namespace, so a connection of
    /// another namespace is no rival, and its controller is another one).
    pub fn rivals(
        &self,
        remote_id: &str,
        namespace: &str,
        name: &str,
        namespaced: bool,
    ) -> Vec<ObjectRef<DeserializeGuard<CachedConnection>>> {
        let inner = self.inner.lock().unwrap();
        inner
            .refs(inner.by_remote.get(remote_id))
            .filter(|f| !namespaced || &*f.namespace == namespace)
            .filter(|f| !(&*f.namespace == namespace && &*f.name == name))
            .map(Facts::object_ref)
            .collect()
    }

    /// True when a connection older than `me` waits for `me`'s org (in `namespace` only, when
    /// given).
    pub fn older_waiting(&self, me: &Claimant, namespace: Option<&str>) -> bool {
        let inner = self.inner.lock().unwrap();
        let waiting = inner
            .refs(inner.by_remote.get(me.remote_id.as_str()))
            .filter(|f| namespace.is_none_or(|ns| &*f.namespace == ns))
            .filter_map(|f| f.waiting.as_deref());
        claims::older_waiting(me, waiting)
    }

    /// How many connections are known (for tests and metrics).
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Feeds the index from one Connection watch; see [`Writer::apply`].
pub struct Writer {
    index: Arc<Index>,
    scope: Option<String>,
    /// The UIDs of a list in progress.
    listing: Option<HashSet<String>>,
    listed_once: bool,
}

impl Writer {
    /// Applies one watch event (before the cache and the controller see it). A (re)list replaces
    /// what the scope held: connections deleted while the watch was down are forgotten.
    pub fn apply(&mut self, event: &watcher::Event<DeserializeGuard<CachedConnection>>) {
        let mut inner = self.index.inner.lock().unwrap();
        match event {
            watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) => {
                let Some(uid) = obj.uid() else { return };
                if let (watcher::Event::InitApply(_), Some(listing)) = (event, self.listing.as_mut()) {
                    listing.insert(uid.clone());
                }
                match Facts::of(obj) {
                    Some(facts) => inner.upsert(&uid, facts),
                    // Not a valid Connection: nothing to look up, but it exists.
                    None => {
                        inner.entry(&uid);
                    }
                }
                // Its status's digest, computed as the object was decoded (see `cached`).
                if let Some(entry) = inner.entries.get_mut(uid.as_str()) {
                    entry.status = obj.0.as_ref().ok().and_then(CachedConnection::status_digest);
                }
            }
            watcher::Event::Delete(obj) => {
                if let Some(uid) = obj.uid() {
                    inner.remove(&uid);
                }
            }
            watcher::Event::Init => self.listing = Some(HashSet::new()),
            watcher::Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                let first = !self.listed_once;
                self.listed_once = true;
                if first {
                    inner.unlisted = inner.unlisted.saturating_sub(1);
                }
                let everyone_listed = inner.unlisted == 0;
                let gone: Vec<Arc<str>> = inner
                    .entries
                    .iter()
                    .filter(|(uid, e)| match &e.facts {
                        Some(f) => {
                            self.scope.as_deref().is_none_or(|s| s == &*f.namespace)
                                && !listed.contains(&***uid)
                        }
                        // Remembered before any watch saw it (a replayed token): kept until every
                        // watch has listed, then only if one listed it.
                        None => everyone_listed && !listed.contains(&***uid) && first,
                    })
                    .map(|(uid, _)| uid.clone())
                    .collect();
                for uid in gone {
                    inner.remove(&uid);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Connection, ConnectionSpec, ConnectionStatus, State};
    use crate::controller::state;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn cached(c: Connection) -> DeserializeGuard<CachedConnection> {
        DeserializeGuard(Ok(c.into()))
    }

    fn conn(
        ns: &str,
        name: &str,
        uid: &str,
        secret: &str,
        remote: Option<&str>,
        state: Option<State>,
    ) -> DeserializeGuard<CachedConnection> {
        let spec: ConnectionSpec = serde_json::from_value(serde_json::json!({
            "team": "t", "provider": "SalesforceProduction", "credentialsSecretRef": {"name": secret}
        }))
        .unwrap();
        let mut c = Connection::new(name, spec);
        c.metadata.namespace = Some(ns.into());
        c.metadata.uid = Some(uid.into());
        c.metadata.creation_timestamp = Some(Time(Timestamp::from_second(uid.len() as i64 * 100).unwrap()));
        c.status = Some(ConnectionStatus {
            remote_id: remote.map(str::to_string),
            state,
            ..Default::default()
        });
        cached(c)
    }

    fn names(refs: Vec<ObjectRef<DeserializeGuard<CachedConnection>>>) -> Vec<String> {
        let mut v: Vec<String> = refs
            .into_iter()
            .map(|r| format!("{}/{}", r.namespace.unwrap_or_default(), r.name))
            .collect();
        v.sort();
        v
    }

    const ORG: &str = "00D000000000001AAA";

    #[test]
    fn lookups_follow_applies_and_deletes() {
        let index = Index::new(1);
        let mut w = index.writer(None);
        w.apply(&watcher::Event::Apply(conn(
            "a",
            "c1",
            "u1",
            "s1",
            Some(ORG),
            Some(State::Active),
        )));
        w.apply(&watcher::Event::Apply(conn("a", "c2", "u2", "s1", None, None)));
        w.apply(&watcher::Event::Apply(conn(
            "b",
            "c3",
            "u3",
            "s1",
            Some(ORG),
            Some(State::Conflict),
        )));
        assert_eq!(names(index.using_secret("a", "s1")), ["a/c1", "a/c2"]);
        assert_eq!(names(index.using_secret("b", "s1")), ["b/c3"]);
        assert!(index.using_secret("a", "other").is_empty());
        assert_eq!(names(index.rivals(ORG, "a", "c1", false)), ["b/c3"]);
        assert!(
            index.rivals(ORG, "a", "c1", true).is_empty(),
            "namespaced: another namespace claims on its own"
        );
        let key = crate::api::org_key(crate::api::Provider::SalesforceProduction, ORG).unwrap();
        assert_eq!(names(index.using_org("a", &key)), ["a/c1"]);

        // c1 moves to another Secret and loses its org: the old keys no longer find it.
        w.apply(&watcher::Event::Apply(conn(
            "a",
            "c1",
            "u1",
            "s2",
            None,
            Some(State::Inactive),
        )));
        assert_eq!(names(index.using_secret("a", "s1")), ["a/c2"]);
        assert_eq!(names(index.using_secret("a", "s2")), ["a/c1"]);
        assert!(index.using_org("a", &key).is_empty());
        assert!(index.rivals(ORG, "b", "c3", false).is_empty());

        w.apply(&watcher::Event::Delete(conn("a", "c2", "u2", "s1", None, None)));
        assert!(index.using_secret("a", "s1").is_empty());
        assert_eq!(index.len(), 2);
    }

    fn child(rv: &str, owner: &str) -> kube::api::ObjectMeta {
        kube::api::ObjectMeta {
            resource_version: Some(rv.into()),
            owner_references: Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    api_version: "crmconnect.io/v1alpha1".into(),
                    kind: "Connection".into(),
                    name: "c1".into(),
                    uid: owner.into(),
                    controller: Some(true),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }
    }

    #[test]
    fn the_event_of_its_own_write_is_recognised_and_no_other() {
        let index = Index::new(1);
        let mut w = index.writer(None);
        w.apply(&watcher::Event::Apply(conn("a", "c1", "u1", "s", None, None)));
        index.writing("u1").wrote(Some("100"));
        assert!(index.own_write(&child("100", "u1")));
        assert!(
            !index.own_write(&child("101", "u1")),
            "a later change by someone else"
        );
        assert!(!index.own_write(&child("100", "u2")), "another owner");
        for rv in ["101", "102", "103", "104"] {
            index.writing("u1").wrote(Some(rv));
        }
        assert!(
            !index.own_write(&child("100", "u1")),
            "only the last few are kept"
        );
        assert!(index.own_write(&child("104", "u1")));
    }

    #[test]
    fn an_event_that_comes_before_the_answer_of_a_write_waits_for_it() {
        let index = Index::new(1);
        let mut w = index.writer(None);
        w.apply(&watcher::Event::Apply(conn("a", "c1", "u1", "s", None, None)));
        let mut wakes = index.wakes(Some("a".into()));
        let mut elsewhere = index.wakes(Some("b".into()));
        let woken = |rx: &mut futures::channel::mpsc::UnboundedReceiver<_>| {
            std::iter::from_fn(|| rx.try_recv().ok())
                .map(|r: ObjectRef<_>| r.to_string())
                .collect::<Vec<_>>()
        };

        // Its own write's event first, then the answer: no one is woken.
        let writing = index.writing("u1");
        assert!(
            index.own_write(&child("200", "u1")),
            "decided when the write is answered"
        );
        writing.wrote(Some("200"));
        assert!(woken(&mut wakes).is_empty(), "its own write");

        // Someone else's change while a write is in flight: woken when the write is answered,
        // not before, and only once both writes in flight are.
        let (first, second) = (index.writing("u1"), index.writing("u1"));
        assert!(index.own_write(&child("300", "u1")));
        first.wrote(Some("301"));
        assert!(woken(&mut wakes).is_empty(), "a write is still in flight");
        second.wrote(Some("302"));
        assert_eq!(woken(&mut wakes).len(), 1, "300 was not ours");
        assert!(woken(&mut elsewhere).is_empty(), "another scope's controller");

        // A write that fails (or is dropped): whatever came meanwhile was not its.
        let failed = index.writing("u1");
        assert!(index.own_write(&child("400", "u1")));
        drop(failed);
        assert_eq!(woken(&mut wakes).len(), 1);

        // No write in flight: a change that is not ours wakes at once, as before.
        assert!(!index.own_write(&child("500", "u1")));
        assert!(woken(&mut wakes).is_empty());
    }

    /// What the controllers of namespaces a and b were sent so far.
    fn sent(
        rx: &mut futures::channel::mpsc::UnboundedReceiver<ObjectRef<DeserializeGuard<CachedConnection>>>,
    ) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|r| r.to_string())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_recheck_wakes_its_connection_when_due_once_and_in_its_own_scope() {
        use std::time::Duration;
        let index = Index::new(2);
        let (mut a, mut b) = (index.writer(Some("a".into())), index.writer(Some("b".into())));
        a.apply(&watcher::Event::Apply(conn("a", "c1", "u1", "s", None, None)));
        b.apply(&watcher::Event::Apply(conn("b", "c2", "u2", "s", None, None)));
        let (mut in_a, mut in_b) = (index.wakes(Some("a".into())), index.wakes(Some("b".into())));
        let ticker = tokio::spawn({
            let index = index.clone();
            async move { index.rechecks().await }
        });
        let at = |secs: f64| tokio::time::sleep(Duration::from_secs_f64(secs));

        index.recheck_in("u1", Some(Duration::from_secs(5)));
        index.recheck_in("u2", Some(Duration::from_secs(2)));
        index.recheck_in("unknown", Some(Duration::from_secs(1)));
        at(1.5).await;
        assert!(
            sent(&mut in_a).is_empty() && sent(&mut in_b).is_empty(),
            "none due yet"
        );
        at(1.0).await; // 2.5 s
        assert!(sent(&mut in_a).is_empty());
        assert_eq!(sent(&mut in_b), ["Connection.v1alpha1.crmconnect.io/c2.b"]);
        at(3.0).await; // 5.5 s
        assert_eq!(sent(&mut in_a), ["Connection.v1alpha1.crmconnect.io/c1.a"]);
        at(10.0).await;
        assert!(
            sent(&mut in_a).is_empty() && sent(&mut in_b).is_empty(),
            "each once"
        );

        // A new recheck replaces the one set before, earlier or later, and `None` clears it.
        index.recheck_in("u1", Some(Duration::from_secs(10)));
        index.recheck_in("u1", Some(Duration::from_secs(3)));
        index.recheck_in("u2", Some(Duration::from_secs(1)));
        index.recheck_in("u2", Some(Duration::from_secs(6)));
        at(3.5).await;
        assert_eq!(
            sent(&mut in_a).len(),
            1,
            "the earlier one, set while the timer slept"
        );
        assert!(sent(&mut in_b).is_empty(), "the later one replaced it");
        at(3.0).await;
        assert_eq!(sent(&mut in_b).len(), 1);
        at(10.0).await;
        assert!(sent(&mut in_a).is_empty() && sent(&mut in_b).is_empty());
        index.recheck_in("u1", Some(Duration::from_secs(1)));
        index.recheck_in("u1", None);
        // A deleted connection's recheck goes with it.
        index.recheck_in("u2", Some(Duration::from_secs(1)));
        b.apply(&watcher::Event::Delete(conn("b", "c2", "u2", "s", None, None)));
        at(5.0).await;
        assert!(sent(&mut in_a).is_empty() && sent(&mut in_b).is_empty());
        assert!(index.inner.lock().unwrap().rechecks.is_empty());
        ticker.abort();
    }

    #[test]
    fn the_whole_status_is_remembered_by_digest_from_the_watch_and_from_its_own_writes() {
        let index = Index::new(1);
        let mut w = index.writer(None);
        let pending = ConnectionStatus::default();
        let active = ConnectionStatus {
            state: Some(State::Active),
            message: Some("validated".into()),
            ..Default::default()
        };
        assert!(
            !index.status_is("u1", state::digest(&pending)),
            "an unknown connection has no status"
        );
        let mut seen = conn("a", "c1", "u1", "s", None, None).0.unwrap().to_connection();
        seen.status = None;
        w.apply(&watcher::Event::Apply(cached(seen.clone())));
        assert!(
            !index.status_is("u1", state::digest(&pending)),
            "no status written yet"
        );
        seen.status = Some(pending.clone());
        w.apply(&watcher::Event::Apply(cached(seen.clone())));
        assert!(index.status_is("u1", state::digest(&pending)));
        assert!(!index.status_is("u1", state::digest(&active)));
        index.status_written("u1", state::digest(&active));
        assert!(index.status_is("u1", state::digest(&active)));
        let mut other = active.clone();
        other.message = Some("validated again".into());
        assert!(
            !index.status_is("u1", state::digest(&other)),
            "a field the cache drops still counts"
        );
        // Someone else rewrites it: the watch event says what the status now is.
        w.apply(&watcher::Event::Apply(cached(seen)));
        assert!(index.status_is("u1", state::digest(&pending)));
        index.status_written("u2", state::digest(&active));
        assert!(
            !index.status_is("u2", state::digest(&active)),
            "not remembered for an unknown connection"
        );
    }

    #[test]
    fn older_waiting_sees_only_waiting_claimants_of_the_org_in_scope() {
        let index = Index::new(1);
        let mut w = index.writer(None);
        // uid length sets the creation time: "u1" (200) is older than "u100" (400).
        w.apply(&watcher::Event::Apply(conn(
            "a",
            "old",
            "u1",
            "s",
            Some(ORG),
            Some(State::Conflict),
        )));
        let me = Claimant {
            namespace: "b".into(),
            name: "me".into(),
            team: "t".into(),
            created: Some(Timestamp::from_second(400).unwrap()),
            remote_id: ORG.into(),
        };
        assert!(index.older_waiting(&me, None));
        assert!(
            !index.older_waiting(&me, Some("b")),
            "another namespace is out of scope"
        );
        // No longer waiting (Active): it does not go first.
        w.apply(&watcher::Event::Apply(conn(
            "a",
            "old",
            "u1",
            "s",
            Some(ORG),
            Some(State::Active),
        )));
        assert!(!index.older_waiting(&me, None));
    }

    #[test]
    fn memory_is_forgotten_with_the_connection() {
        let index = Index::new(1);
        let mut w = index.writer(None);
        w.apply(&watcher::Event::Init);
        w.apply(&watcher::Event::InitApply(conn("a", "c1", "u1", "s", None, None)));
        w.apply(&watcher::Event::InitDone);
        index.memory("u1", |m| m.failures = 3);
        assert_eq!(index.memory("u1", |m| m.failures), 3);
        w.apply(&watcher::Event::Delete(conn("a", "c1", "u1", "s", None, None)));
        assert_eq!(index.memory("u1", |m| m.failures), 0);
        // A reconcile that ends after the delete leaves nothing behind.
        index.memory("u1", |m| m.failures = 1);
        assert_eq!(index.len(), 0);
    }

    #[test]
    fn a_relist_forgets_what_was_deleted_while_the_watch_was_down() {
        let index = Index::new(1);
        let mut w = index.writer(Some("a".into()));
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(conn("a", "c1", "u1", "s", None, None)),
            watcher::Event::InitApply(conn("a", "c2", "u2", "s", None, None)),
            watcher::Event::InitDone,
        ] {
            w.apply(&event);
        }
        index.memory("u2", |m| m.secret_polls = 2);
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(conn("a", "c2", "u2", "s", None, None)),
            watcher::Event::InitDone,
        ] {
            w.apply(&event);
        }
        assert!(index.using_secret("a", "s").len() == 1);
        assert_eq!(
            index.memory("u2", |m| m.secret_polls),
            2,
            "kept across the relist"
        );
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn what_is_remembered_before_the_first_list_waits_for_every_watch() {
        let index = Index::new(2);
        let mut a = index.writer(Some("a".into()));
        let mut b = index.writer(Some("b".into()));
        // A token replayed from the journal for a connection of namespace b, and one for a
        // connection that no longer exists.
        index.memory("ub", |m| m.failures = 7);
        index.memory("gone", |m| m.failures = 1);
        a.apply(&watcher::Event::Init);
        a.apply(&watcher::Event::InitDone);
        assert_eq!(index.len(), 2, "b has not listed yet");
        b.apply(&watcher::Event::Init);
        b.apply(&watcher::Event::InitApply(conn("b", "c", "ub", "s", None, None)));
        b.apply(&watcher::Event::InitDone);
        assert_eq!(index.memory("ub", |m| m.failures), 7);
        assert_eq!(index.memory("gone", |m| m.failures), 0);
        assert_eq!(index.len(), 1);
    }
}
