//! Which orchestrator to dial, and when: the configured list, a random first pick
//! (so a restarted fleet spreads its first attempts), the leader's URL when a
//! standby names it (`secbeat-leader`), and otherwise the next entry in turn. A
//! standby also says when leadership can move at the earliest
//! (`secbeat-retry-after-ms`: the leader's lease runs out then unless renewed);
//! an agent whose leader is gone comes back then, not a backoff step later.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use rand::Rng;
use tonic::transport::Endpoint;

/// Sets an endpoint up as every orchestrator endpoint is (timeouts, keep-alive,
/// TLS); an error says why it cannot be.
pub type Configure = Arc<dyn Fn(Endpoint) -> Result<Endpoint, String> + Send + Sync>;

/// The orchestrators an agent knows, and the one it dials next.
#[derive(Clone)]
pub struct Orchestrators {
    configured: Vec<Endpoint>,
    /// The leader a standby named, if it is not in the list.
    hinted: Option<Endpoint>,
    next: usize,
    configure: Configure,
    /// When a standby said leadership can move.
    retry_at: Option<Instant>,
    /// The last lost session was followed to a named leader (once in a row).
    followed: bool,
}

/// What to do after a session was lost or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Dial [`Orchestrators::current`] at once: a standby named the leader.
    DialNow,
    /// Dial [`Orchestrators::current`] after the backoff's delay.
    AfterDelay,
}

impl std::fmt::Debug for Orchestrators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrators")
            .field("configured", &self.configured.len())
            .field("current", &self.current().uri())
            .finish()
    }
}

impl Orchestrators {
    /// `configured` (at least one, already set up by `configure`) starting at a
    /// random entry; `configure` also sets up an endpoint built from a hint.
    pub fn new(configured: Vec<Endpoint>, configure: Configure, rng: &mut impl Rng) -> Self {
        assert!(!configured.is_empty(), "at least one orchestrator");
        let next = rng.random_range(0..configured.len());
        Self {
            configured,
            hinted: None,
            next,
            configure,
            retry_at: None,
            followed: false,
        }
    }

    /// The orchestrator to dial now.
    pub fn current(&self) -> &Endpoint {
        self.hinted.as_ref().unwrap_or(&self.configured[self.next])
    }

    /// How many are configured.
    pub fn len(&self) -> usize {
        self.configured.len()
    }

    /// Whether none are (never: `new` wants one).
    pub fn is_empty(&self) -> bool {
        self.configured.is_empty()
    }

    /// The current one failed without naming a leader: move on to the next entry.
    pub fn rotate(&mut self) {
        if self.hinted.take().is_none() {
            self.next = (self.next + 1) % self.configured.len();
        }
    }

    /// A session was established: what a standby said before is old news.
    pub fn connected(&mut self) {
        self.retry_at = None;
    }

    /// A standby said leadership can move in `after` (its leader's lease runs out).
    pub fn retry_after(&mut self, after: Duration, now: Instant) {
        self.retry_at = Some(now + after);
    }

    /// How long to wait before the next attempt: until a standby said leadership
    /// can move, plus `spread` (a random share of a second, so a fleet does not
    /// arrive at one instant), when one said so; otherwise the backoff's `delay`.
    ///
    /// The standby's word replaces the backoff both ways. Nothing can lead
    /// before the old leader's lease runs out, so an agent that came back sooner
    /// would only be refused again (a fleet doing so twice a second loads the
    /// standby that is about to lead); and one deep in its backoff comes back
    /// when leadership moves, not a backoff step later.
    pub fn delay(&mut self, delay: Duration, now: Instant, spread: Duration) -> Duration {
        match self.retry_at.take() {
            Some(at) => at.saturating_duration_since(now) + spread,
            None => delay,
        }
    }

    /// Where to go after a session ended, given the leader the orchestrator
    /// named, if it named one:
    /// - itself: it was just elected and is loading the fleet's state; stay and
    ///   come back to it after the delay;
    /// - another: go there at once, but only once in a row, so two standbys with
    ///   stale pointers cannot make a busy loop;
    /// - none (or a hint just followed failed): the next entry, after the delay.
    pub fn after_lost(&mut self, leader: Option<&str>) -> Next {
        let followed = std::mem::take(&mut self.followed);
        match leader {
            Some(leader) if self.is_current(leader) => Next::AfterDelay,
            Some(leader) if !followed && self.follow(leader) => {
                self.followed = true;
                Next::DialNow
            }
            _ => {
                self.rotate();
                Next::AfterDelay
            }
        }
    }

    /// Whether `leader` is the orchestrator dialed now.
    fn is_current(&self, leader: &str) -> bool {
        self.current().uri().to_string().trim_end_matches('/') == leader.trim_end_matches('/')
    }

    /// A standby named the leader: dial it next. Returns false when the hint is not
    /// a URL (it is then ignored).
    pub fn follow(&mut self, leader: &str) -> bool {
        let wanted = leader.trim_end_matches('/');
        if let Some(index) = self
            .configured
            .iter()
            .position(|endpoint| endpoint.uri().to_string().trim_end_matches('/') == wanted)
        {
            self.next = index;
            self.hinted = None;
            return true;
        }
        let configured = Endpoint::from_shared(leader.to_owned())
            .map_err(|error| error.to_string())
            .and_then(|endpoint| (self.configure)(endpoint));
        match configured {
            Ok(endpoint) => {
                self.hinted = Some(endpoint);
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn endpoints(urls: &[&'static str]) -> Vec<Endpoint> {
        urls.iter().map(|url| Endpoint::from_static(url)).collect()
    }

    fn same() -> Configure {
        Arc::new(Ok)
    }

    fn current(list: &Orchestrators) -> String {
        list.current().uri().to_string()
    }

    #[test]
    fn starts_anywhere_rotates_through_all_and_follows_the_leader() {
        let urls = ["http://a:1", "http://b:1", "http://c:1"];
        let mut starts = std::collections::HashSet::new();
        for seed in 0..32 {
            let list = Orchestrators::new(
                endpoints(&urls),
                same(),
                &mut rand::rngs::StdRng::seed_from_u64(seed),
            );
            starts.insert(current(&list));
        }
        assert_eq!(starts.len(), 3, "the first pick is spread over the list");

        let mut list = Orchestrators::new(
            endpoints(&urls),
            same(),
            &mut rand::rngs::StdRng::seed_from_u64(1),
        );
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 {
            seen.insert(current(&list));
            list.rotate();
        }
        assert_eq!(seen.len(), 3, "rotation visits every entry");

        assert!(list.follow("http://b:1"));
        assert_eq!(current(&list), "http://b:1/");
        // A leader outside the list (its advertise_url) is dialled as named...
        assert!(list.follow("http://10.0.0.9:50051"));
        assert_eq!(current(&list), "http://10.0.0.9:50051/");
        // ...until it fails: then the list again, where it was.
        list.rotate();
        assert_eq!(current(&list), "http://b:1/");
        assert!(!list.follow("not a url"));
    }

    #[test]
    fn a_standby_saying_when_leadership_can_move_sets_the_next_wait_once() {
        let mut list = Orchestrators::new(
            endpoints(&["http://a:1"]),
            same(),
            &mut rand::rngs::StdRng::seed_from_u64(1),
        );
        let now = Instant::now();
        let backoff = Duration::from_secs(4);
        let spread = Duration::from_millis(300);
        assert_eq!(
            list.delay(backoff, now, spread),
            backoff,
            "no word from a standby"
        );
        list.retry_after(Duration::from_millis(1500), now);
        assert_eq!(
            list.delay(backoff, now, spread),
            Duration::from_millis(1800),
            "sooner than a long backoff"
        );
        assert_eq!(list.delay(backoff, now, spread), backoff, "used once");
        // Not sooner than leadership can move: an earlier attempt is refused.
        let short = Duration::from_millis(500);
        list.retry_after(Duration::from_secs(3), now);
        assert_eq!(list.delay(short, now, spread), Duration::from_millis(3300));
        // A time already passed leaves the spread.
        list.retry_after(Duration::ZERO, now);
        assert_eq!(list.delay(short, now + Duration::from_secs(1), spread), spread);
    }

    #[test]
    fn after_a_loss_it_stays_follows_once_or_rotates() {
        let mut list = Orchestrators::new(
            endpoints(&["http://a:50051", "http://b:50051"]),
            same(),
            &mut rand::rngs::StdRng::seed_from_u64(1),
        );
        let first = current(&list);
        let other = if first.contains("//a") {
            "http://b:50051/"
        } else {
            "http://a:50051/"
        };
        // The orchestrator reached names itself (elected, loading): stay.
        assert_eq!(
            list.after_lost(Some(first.trim_end_matches('/'))),
            Next::AfterDelay
        );
        assert_eq!(current(&list), first, "stays with the one taking over");
        // A standby names the other: go there at once.
        assert_eq!(list.after_lost(Some(other)), Next::DialNow);
        assert_eq!(current(&list), other);
        // Named again right after following: not twice in a row; rotate instead.
        assert_eq!(list.after_lost(Some(&first)), Next::AfterDelay);
        assert_eq!(current(&list), first, "rotated on from the followed one");
        // Now a pointer may be followed again.
        assert_eq!(list.after_lost(Some(other)), Next::DialNow);
        // No hint: the next entry.
        assert_eq!(list.after_lost(None), Next::AfterDelay);
        assert_eq!(current(&list), first);
    }
}
