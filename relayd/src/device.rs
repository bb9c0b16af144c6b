//! What the relay knows of one device beyond its session's streams: the
//! agent's last report of its local service, the models it is loading for
//! requests this relay sent it, and how fast it generates. The router
//! ([`crate::route`]) reads it to choose among a user's devices.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use daemon::observe::Speed;
use tunnel_proto::ServiceState;
use tunnel_proto::message::MAX_SERVICE_MODELS;

/// Most models one device is tracked loading at once; past it, a load is
/// not tracked (requests for that model rank as if it were on disk).
const MAX_LOADS: usize = 16;

#[derive(Debug, Default)]
pub struct DeviceState {
    /// The agent's last report of its local service (`service`).
    service: Mutex<Option<ServiceState>>,
    /// Models requests sent here are loading, and how many such requests
    /// wait for each.
    loads: Mutex<Vec<(String, u32)>>,
    /// Tokens per second over its recent streams.
    pub speed: Arc<Speed>,
}

impl DeviceState {
    fn service_lock(&self) -> MutexGuard<'_, Option<ServiceState>> {
        self.service.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn loads_lock(&self) -> MutexGuard<'_, Vec<(String, u32)>> {
        self.loads.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn service(&self) -> Option<ServiceState> {
        self.service_lock().clone()
    }

    /// What `read` makes of the agent's last report, read in place.
    pub fn with_service<R>(&self, read: impl FnOnce(Option<&ServiceState>) -> R) -> R {
        read(self.service_lock().as_ref())
    }

    pub(crate) fn set_service(&self, s: ServiceState) {
        *self.service_lock() = Some(s);
    }

    /// The owner's priority for the device (`[routing] priority`).
    pub fn priority(&self) -> i32 {
        self.service_lock().as_ref().map_or(0, |s| s.priority)
    }

    /// Whether a request is loading `model` here (one this relay sent, or
    /// one the agent reports), and the owner lets others wait for it (no
    /// `spread_loads`).
    pub fn loading(&self, model: &str) -> bool {
        let same = |m: &String| daemon::model::same_model(m, model);
        let (spread, reported) = match self.service_lock().as_ref() {
            Some(s) => (s.spread_loads, s.loading.iter().any(same)),
            None => (false, false),
        };
        !spread && (reported || self.loads_lock().iter().any(|(m, _)| same(m)))
    }

    /// The models requests are loading here now: those this relay sent,
    /// then those the agent reports.
    pub fn loads(&self) -> Vec<String> {
        let mut models: Vec<String> = self.loads_lock().iter().map(|(m, _)| m.clone()).collect();
        if let Some(s) = self.service_lock().as_ref() {
            models.extend(
                s.loading.iter().filter(|m| !models.contains(m)).cloned().collect::<Vec<_>>(),
            );
        }
        models
    }

    /// A request for `model`, which the device has on disk but not in
    /// memory, went here: until it is answered the model counts as
    /// loading. `None` when too many loads are tracked already.
    pub fn start_load(&self, model: &str) -> Option<Load<'_>> {
        let mut loads = self.loads_lock();
        match loads.iter().position(|(m, _)| m == model) {
            Some(i) => loads[i].1 += 1,
            None if loads.len() < MAX_LOADS => loads.push((model.to_owned(), 1)),
            None => return None,
        }
        Some(Load { device: self, model: model.to_owned() })
    }
}

/// A request loading a model on a device; dropped, it no longer waits.
#[derive(Debug)]
pub struct Load<'a> {
    device: &'a DeviceState,
    model: String,
}

impl Load<'_> {
    /// The device answered: the model is in memory now, as far as routing
    /// goes, until the agent's next report says otherwise.
    pub fn done(self) {
        if let Some(s) = self.device.service_lock().as_mut()
            && !s.models.iter().any(|m| m == &self.model)
            && s.models.len() < MAX_SERVICE_MODELS
        {
            s.models.push(self.model.clone());
        }
    }
}

impl Drop for Load<'_> {
    fn drop(&mut self) {
        let mut loads = self.device.loads_lock();
        if let Some(i) = loads.iter().position(|(m, _)| m == &self.model) {
            loads[i].1 -= 1;
            if loads[i].1 == 0 {
                loads.swap_remove(i);
            }
        }
    }
}

/// Most device names counted one by one in [`Tally`]; the rest count as
/// `other`.
pub const MAX_TALLIED: usize = 64;

/// Requests routed to each device name among a user's devices, across
/// users (metrics carry no user): the first [`MAX_TALLIED`] names seen,
/// then `other`.
#[derive(Debug, Default)]
pub struct Tally(Mutex<Vec<(String, u64)>>);

impl Tally {
    pub fn add(&self, device: &str) {
        let mut names = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let name = if names.len() < MAX_TALLIED || names.iter().any(|(n, _)| n == device) {
            device
        } else {
            "other"
        };
        match names.iter_mut().find(|(n, _)| n == name) {
            Some((_, count)) => *count += 1,
            None => names.push((name.to_owned(), 1)),
        }
    }

    /// Each name with its count, sorted by name.
    pub fn counts(&self) -> Vec<(String, u64)> {
        let mut names = self.0.lock().unwrap_or_else(PoisonError::into_inner).clone();
        names.sort();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_disk(model: &str) -> DeviceState {
        let d = DeviceState::default();
        d.set_service(ServiceState { available: vec![model.into()], ..ServiceState::default() });
        d
    }

    #[test]
    fn a_model_is_loading_until_its_last_request_ends_and_loaded_once_answered() {
        let d = on_disk("m:7b");
        let first = d.start_load("m:7b").unwrap();
        let second = d.start_load("m:7b").unwrap();
        assert!(d.loading("m:7b"));
        drop(first);
        assert!(d.loading("m:7b"), "the second request still waits");
        second.done();
        assert!(!d.loading("m:7b"));
        assert_eq!(d.service().unwrap().models, ["m:7b"]);
    }

    #[test]
    fn an_owner_who_spreads_loads_is_never_waited_for() {
        let d = DeviceState::default();
        d.set_service(ServiceState { spread_loads: true, ..ServiceState::default() });
        let _load = d.start_load("m").unwrap();
        assert!(!d.loading("m"));
    }

    #[test]
    fn device_names_past_the_bound_count_as_other() {
        let t = Tally::default();
        for i in 0..MAX_TALLIED {
            t.add(&format!("d{i:02}"));
        }
        t.add("d00");
        t.add("one-more");
        t.add("and-another");
        let counts = t.counts();
        assert_eq!(counts.len(), MAX_TALLIED + 1);
        assert!(counts.contains(&("d00".into(), 2)));
        assert!(counts.contains(&("other".into(), 2)));
    }

    #[test]
    fn loads_tracked_are_bounded() {
        let d = DeviceState::default();
        let held: Vec<_> =
            (0..MAX_LOADS).map(|i| d.start_load(&format!("m{i}")).unwrap()).collect();
        assert!(d.start_load("one-more").is_none());
        assert!(d.start_load("m0").is_some(), "a model already loading takes more requests");
        drop(held);
        assert!(d.loads().is_empty());
    }
}
