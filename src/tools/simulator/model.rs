//! The simulated world: cards with home countries, spending habits and favourite merchants;
//! merchants with categories, countries and channels; a Poisson stream of legitimate payments
//! with a day/night rhythm; and injected, labelled fraud incidents. Everything comes from one
//! seeded ChaCha RNG, so a seed and a configuration give the same events on every machine.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::distr::weighted::WeightedIndex;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, LogNormal};
use uuid::Uuid;

use crate::tools::payments::{Channel, EntryMode, Payment};

/// What the simulator generates; every field changes the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// RNG seed.
    pub seed: u64,
    /// Number of cards.
    pub cards: usize,
    /// Number of merchants.
    pub merchants: usize,
    /// Event time of the start of the stream, ms since the epoch.
    pub start_ms: i64,
    /// Average legitimate payments per second of event time.
    pub events_per_sec: f64,
    /// Fraud incidents started per 10,000 legitimate payments.
    pub incidents_per_10k: f64,
    /// Whether the rate follows a day/night curve (on event time). Off for live-paced runs so
    /// that event time keeps step with the wall clock at the requested rate.
    pub diurnal: bool,
}

impl SimConfig {
    /// Cards in the world the shipped models were trained on (`scripts/train.sh`).
    pub const TRAINED_CARDS: usize = 5_000;
    /// Merchants in that world.
    pub const TRAINED_MERCHANTS: usize = 1_500;
    /// Payments per second of event time in that world: about 1.2 per card per hour.
    pub const TRAINED_EVENTS_PER_SEC: f64 = 1.67;
    /// Fraud incidents per 10,000 payments in that world.
    pub const TRAINED_INCIDENTS_PER_10K: f64 = 10.0;
}

/// The world the shipped models were trained on.
impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 42,
            cards: Self::TRAINED_CARDS,
            merchants: Self::TRAINED_MERCHANTS,
            start_ms: 1_767_225_600_000, // 2026-01-01T00:00:00Z
            events_per_sec: Self::TRAINED_EVENTS_PER_SEC,
            incidents_per_10k: Self::TRAINED_INCIDENTS_PER_10K,
            diurnal: true,
        }
    }
}

/// The kinds of fraud the simulator injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// Many tiny online payments at a few merchants within minutes, probing a stolen card
    /// number; sometimes cashed out with one large purchase.
    CardTesting,
    /// A taken-over account: a few large online payments at new merchants abroad from a new
    /// device.
    AccountTakeover,
    /// A cloned card used many times in quick succession at shops and cash machines.
    Velocity,
}

impl Pattern {
    /// The label's name.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::CardTesting => "card_testing",
            Pattern::AccountTakeover => "account_takeover",
            Pattern::Velocity => "velocity",
        }
    }
}

/// Ground truth for one event. Never part of the event itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Label {
    /// The event's id.
    pub event_id: Uuid,
    /// The card.
    pub card_id: String,
    /// Event time, ms.
    pub event_time: i64,
    /// The fraud pattern, `None` for a legitimate payment.
    pub pattern: Option<Pattern>,
    /// The incident the event belongs to (numbered from 1), `None` if legitimate.
    pub incident: Option<u64>,
}

impl Label {
    /// CSV header for [`Label::csv_line`].
    pub const CSV_HEADER: &'static str = "event_id,card_id,event_time,is_fraud,pattern,incident";

    /// One CSV line, without the newline.
    pub fn csv_line(&self) -> String {
        format!(
            "{},{},{},{},{},{}",
            self.event_id,
            self.card_id,
            self.event_time,
            u8::from(self.pattern.is_some()),
            self.pattern.map_or("", Pattern::name),
            self.incident.map_or(String::new(), |i| i.to_string()),
        )
    }
}

struct Country {
    code: &'static str,
    currency: &'static str,
    /// Units of the currency per euro, to scale amounts.
    per_eur: f64,
    /// Share of cards issued here.
    weight: f64,
    /// First octet of the made-up client IP addresses from here.
    ip_octet: u8,
}

const COUNTRIES: &[Country] = &[
    Country {
        code: "NL",
        currency: "EUR",
        per_eur: 1.0,
        weight: 0.22,
        ip_octet: 145,
    },
    Country {
        code: "DE",
        currency: "EUR",
        per_eur: 1.0,
        weight: 0.20,
        ip_octet: 91,
    },
    Country {
        code: "FR",
        currency: "EUR",
        per_eur: 1.0,
        weight: 0.14,
        ip_octet: 90,
    },
    Country {
        code: "ES",
        currency: "EUR",
        per_eur: 1.0,
        weight: 0.08,
        ip_octet: 88,
    },
    Country {
        code: "IT",
        currency: "EUR",
        per_eur: 1.0,
        weight: 0.08,
        ip_octet: 93,
    },
    Country {
        code: "BE",
        currency: "EUR",
        per_eur: 1.0,
        weight: 0.06,
        ip_octet: 81,
    },
    Country {
        code: "GB",
        currency: "GBP",
        per_eur: 0.85,
        weight: 0.12,
        ip_octet: 86,
    },
    Country {
        code: "PL",
        currency: "PLN",
        per_eur: 4.3,
        weight: 0.04,
        ip_octet: 83,
    },
    Country {
        code: "US",
        currency: "USD",
        per_eur: 1.08,
        weight: 0.06,
        ip_octet: 73,
    },
    // Issue almost no cards; where taken-over accounts tend to be used from.
    Country {
        code: "BR",
        currency: "BRL",
        per_eur: 5.9,
        weight: 0.0,
        ip_octet: 177,
    },
    Country {
        code: "NG",
        currency: "NGN",
        per_eur: 1650.0,
        weight: 0.0,
        ip_octet: 105,
    },
    Country {
        code: "ID",
        currency: "IDR",
        per_eur: 17500.0,
        weight: 0.0,
        ip_octet: 114,
    },
    Country {
        code: "TR",
        currency: "TRY",
        per_eur: 37.0,
        weight: 0.0,
        ip_octet: 78,
    },
];

/// Countries fraudsters operate from, by index into `COUNTRIES`.
const FRAUD_COUNTRIES: &[usize] = &[8, 9, 10, 11, 12, 6];

struct Category {
    mcc: &'static str,
    label: &'static str,
    /// Share of merchants.
    weight: f64,
    /// Median ticket in euros.
    median_eur: f64,
    /// Share of merchants of this category that sell online.
    online_share: f64,
}

const CATEGORIES: &[Category] = &[
    Category {
        mcc: "5411",
        label: "Grocery",
        weight: 0.20,
        median_eur: 32.0,
        online_share: 0.05,
    },
    Category {
        mcc: "5812",
        label: "Restaurant",
        weight: 0.14,
        median_eur: 38.0,
        online_share: 0.02,
    },
    Category {
        mcc: "5814",
        label: "Fast Food",
        weight: 0.10,
        median_eur: 11.0,
        online_share: 0.10,
    },
    Category {
        mcc: "5541",
        label: "Fuel",
        weight: 0.07,
        median_eur: 58.0,
        online_share: 0.0,
    },
    Category {
        mcc: "5912",
        label: "Pharmacy",
        weight: 0.05,
        median_eur: 19.0,
        online_share: 0.10,
    },
    Category {
        mcc: "5999",
        label: "Store",
        weight: 0.09,
        median_eur: 28.0,
        online_share: 0.40,
    },
    Category {
        mcc: "5651",
        label: "Clothing",
        weight: 0.07,
        median_eur: 65.0,
        online_share: 0.50,
    },
    Category {
        mcc: "5732",
        label: "Electronics",
        weight: 0.04,
        median_eur: 160.0,
        online_share: 0.50,
    },
    Category {
        mcc: "4121",
        label: "Rides",
        weight: 0.05,
        median_eur: 17.0,
        online_share: 0.95,
    },
    Category {
        mcc: "4511",
        label: "Airlines",
        weight: 0.02,
        median_eur: 320.0,
        online_share: 0.95,
    },
    Category {
        mcc: "7011",
        label: "Hotel",
        weight: 0.03,
        median_eur: 210.0,
        online_share: 0.70,
    },
    Category {
        mcc: "5815",
        label: "Digital",
        weight: 0.05,
        median_eur: 9.0,
        online_share: 1.0,
    },
    Category {
        mcc: "5967",
        label: "Direct Sales",
        weight: 0.02,
        median_eur: 24.0,
        online_share: 1.0,
    },
    Category {
        mcc: "4829",
        label: "Money Transfer",
        weight: 0.01,
        median_eur: 180.0,
        online_share: 0.90,
    },
    Category {
        mcc: "5944",
        label: "Jewellers",
        weight: 0.01,
        median_eur: 380.0,
        online_share: 0.30,
    },
    Category {
        mcc: "6011",
        label: "ATM",
        weight: 0.05,
        median_eur: 100.0,
        online_share: 0.0,
    },
];

const NAME_FIRST: &[&str] = &[
    "Blue", "Harbor", "Golden", "North", "Urban", "Green", "Silver", "Royal", "Bright", "Old",
    "Little", "Grand", "Central", "Sunny", "Red", "River", "Oak", "City", "Prime", "Lucky",
];
const NAME_SECOND: &[&str] = &[
    "Lion", "Mill", "Bridge", "Market", "Corner", "Garden", "Square", "Anchor", "Star", "Tower",
    "Field", "Lane", "Point", "House", "Gate", "Bay", "Hill", "Stone", "Park", "Dock",
];

/// Relative activity per hour of day (UTC), shaped like card traffic: quiet at night, peaks at
/// lunch and in the early evening.
const DIURNAL: [f64; 24] = [
    0.25, 0.15, 0.10, 0.08, 0.08, 0.12, 0.30, 0.55, 0.80, 0.90, 0.95, 1.00, 1.00, 0.95, 0.90, 0.90,
    0.95, 1.00, 1.00, 0.90, 0.75, 0.60, 0.45, 0.35,
];

struct Merchant {
    id: String,
    name: String,
    category: usize,
    country: usize,
    online: bool,
}

struct Card {
    id: String,
    account: String,
    country: usize,
    /// Multiplier on category medians: how big a spender the cardholder is.
    spend: f64,
    favourites: Vec<usize>,
    device: String,
    ip: String,
}

/// An event waiting in the schedule, ordered by event time then by creation.
struct Scheduled {
    time: i64,
    seq: u64,
    payment: Payment,
    label: Label,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.time, self.seq) == (o.time, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.time, self.seq).cmp(&(o.time, o.seq))
    }
}

/// An endless, deterministic stream of payments and their labels, in event-time order.
pub struct Simulator {
    cfg: SimConfig,
    rng: ChaCha8Rng,
    merchants: Vec<Merchant>,
    online_by_category: Vec<Vec<usize>>,
    physical_by_country_category: Vec<Vec<Vec<usize>>>,
    cards: Vec<Card>,
    card_picker: WeightedIndex<f64>,
    category_picker: WeightedIndex<f64>,
    gap: Exp<f64>,
    clock_ms: f64,
    seq: u64,
    incidents: u64,
    schedule: BinaryHeap<Reverse<Scheduled>>,
}

fn hex_id(rng: &mut ChaCha8Rng, prefix: &str, digits: usize) -> String {
    let n = rng.next_u64();
    let s = format!("{n:016x}");
    format!("{prefix}{}", &s[..digits.min(16)])
}

fn ip(rng: &mut ChaCha8Rng, octet: u8) -> String {
    format!(
        "{octet}.{}.{}.{}",
        rng.random_range(0..=255u8),
        rng.random_range(0..=255u8),
        rng.random_range(1..=254u8)
    )
}

impl Simulator {
    /// Builds the world for `cfg`. Errors only on nonsensical configurations.
    pub fn new(cfg: SimConfig) -> Result<Self, String> {
        if cfg.cards == 0 || cfg.merchants < CATEGORIES.len() {
            return Err(format!(
                "need at least 1 card and {} merchants",
                CATEGORIES.len()
            ));
        }
        if !(cfg.events_per_sec.is_finite() && cfg.events_per_sec > 0.0) {
            return Err("the event rate must be a positive number".into());
        }
        if !(cfg.incidents_per_10k.is_finite() && cfg.incidents_per_10k >= 0.0) {
            return Err("the fraud incident rate must be zero or more".into());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let err = |e: rand::distr::weighted::Error| e.to_string();
        let category_picker =
            WeightedIndex::new(CATEGORIES.iter().map(|c| c.weight)).map_err(err)?;
        let issuing = WeightedIndex::new(COUNTRIES.iter().map(|c| c.weight)).map_err(err)?;

        // Merchants: at least one of every category, then by category weight. Physical
        // merchants are in card-issuing countries; online ones anywhere.
        let mut merchants = Vec::with_capacity(cfg.merchants);
        for i in 0..cfg.merchants {
            let category = if i < CATEGORIES.len() {
                i
            } else {
                category_picker.sample(&mut rng)
            };
            let cat = &CATEGORIES[category];
            let online = rng.random_bool(cat.online_share);
            let country = if online && rng.random_bool(0.15) {
                rng.random_range(0..COUNTRIES.len())
            } else {
                issuing.sample(&mut rng)
            };
            let name = format!(
                "{} {} {}",
                NAME_FIRST[rng.random_range(0..NAME_FIRST.len())],
                NAME_SECOND[rng.random_range(0..NAME_SECOND.len())],
                cat.label
            );
            merchants.push(Merchant {
                id: hex_id(&mut rng, "mer_", 10),
                name,
                category,
                country,
                online,
            });
        }
        // Every category needs a physical merchant in every country for the lookups below;
        // where none was drawn, fall back to any merchant of the category.
        let mut physical_by_country_category =
            vec![vec![Vec::new(); CATEGORIES.len()]; COUNTRIES.len()];
        let mut online_by_category = vec![Vec::new(); CATEGORIES.len()];
        for (i, m) in merchants.iter().enumerate() {
            if m.online {
                online_by_category[m.category].push(i);
            } else {
                physical_by_country_category[m.country][m.category].push(i);
            }
        }
        for c in 0..CATEGORIES.len() {
            let any: Vec<usize> = (0..merchants.len())
                .filter(|&i| merchants[i].category == c)
                .collect();
            if online_by_category[c].is_empty() {
                online_by_category[c] = any.clone();
            }
            for country in physical_by_country_category.iter_mut() {
                if country[c].is_empty() {
                    country[c] = any.clone();
                }
            }
        }

        let spend = LogNormal::new(0.0, 0.45).map_err(|e| e.to_string())?;
        let activity = LogNormal::new(0.0, 1.0).map_err(|e| e.to_string())?;
        let mut cards = Vec::with_capacity(cfg.cards);
        let mut weights = Vec::with_capacity(cfg.cards);
        for _ in 0..cfg.cards {
            let country = issuing.sample(&mut rng);
            // One in ten cards is a second card on the previous card's account.
            let account = match cards.last() {
                Some(prev) if rng.random_bool(0.1) => Card::account_of(prev),
                _ => hex_id(&mut rng, "acc_", 10),
            };
            let n_fav = rng.random_range(6..=20);
            let mut favourites = Vec::with_capacity(n_fav);
            for _ in 0..n_fav {
                let cat = category_picker.sample(&mut rng);
                let pool = if rng.random_bool(0.25) {
                    &online_by_category[cat]
                } else {
                    &physical_by_country_category[country][cat]
                };
                favourites.push(pool[rng.random_range(0..pool.len())]);
            }
            let device = hex_id(&mut rng, "dev_", 12);
            let ip = ip(&mut rng, COUNTRIES[country].ip_octet);
            cards.push(Card {
                id: hex_id(&mut rng, "crd_", 14),
                account,
                country,
                spend: spend.sample(&mut rng),
                favourites,
                device,
                ip,
            });
            weights.push(activity.sample(&mut rng));
        }
        let card_picker = WeightedIndex::new(weights).map_err(err)?;
        let mean_diurnal = DIURNAL.iter().sum::<f64>() / 24.0;
        let candidate_rate = if cfg.diurnal {
            cfg.events_per_sec / mean_diurnal
        } else {
            cfg.events_per_sec
        };
        let gap = Exp::new(candidate_rate / 1000.0).map_err(|e| e.to_string())?;
        Ok(Simulator {
            clock_ms: cfg.start_ms as f64,
            cfg,
            rng,
            merchants,
            online_by_category,
            physical_by_country_category,
            cards,
            card_picker,
            category_picker,
            gap,
            seq: 0,
            incidents: 0,
            schedule: BinaryHeap::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// Moves the start of event time to `start_ms`; call it before drawing any event. A live
    /// run starts its clock once the world is built (300,000 cards take about a second), so
    /// that paced events leave at their event time, not that much after it.
    pub fn start_at(&mut self, start_ms: i64) {
        self.cfg.start_ms = start_ms;
        self.clock_ms = start_ms as f64;
    }

    fn uuid(&mut self) -> Uuid {
        let mut bytes = [0u8; 16];
        self.rng.fill_bytes(&mut bytes);
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }

    /// Amount in minor units for a ticket of `eur` euros in `country`'s currency, with the
    /// round-number habit of real tickets.
    fn amount_minor(&mut self, eur: f64, country: usize) -> i64 {
        let local = (eur * COUNTRIES[country].per_eur).max(0.01);
        let minor = if self.rng.random_bool(0.12) {
            (local.round().max(1.0)) * 100.0
        } else {
            (local * 100.0).round()
        };
        minor.max(1.0) as i64
    }

    #[allow(clippy::too_many_arguments)]
    fn payment(
        &mut self,
        time: i64,
        card: usize,
        merchant: usize,
        amount_minor: i64,
        entry_mode: Option<EntryMode>,
        device: Option<String>,
        ip: Option<String>,
    ) -> Payment {
        let event_id = self.uuid();
        let m = &self.merchants[merchant];
        let c = &self.cards[card];
        let cat = &CATEGORIES[m.category];
        let atm = cat.mcc == "6011";
        let (channel, card_present) = if atm {
            (Channel::Atm, true)
        } else if m.online {
            if m.category == 9 || m.category == 10 {
                // Airlines and hotels still take some payments by phone.
                if self.rng.random_bool(0.05) {
                    (Channel::Moto, false)
                } else {
                    (Channel::Ecommerce, false)
                }
            } else {
                (Channel::Ecommerce, false)
            }
        } else {
            (Channel::Pos, true)
        };
        let entry_mode = entry_mode.unwrap_or_else(|| match channel {
            Channel::Atm => EntryMode::Chip,
            Channel::Ecommerce => {
                if self.rng.random_bool(0.45) {
                    EntryMode::CredentialOnFile
                } else {
                    EntryMode::Manual
                }
            }
            Channel::Moto => EntryMode::Manual,
            Channel::Pos => {
                let contactless_limit = 50.0 * 100.0 * COUNTRIES[m.country].per_eur;
                if (amount_minor as f64) <= contactless_limit && self.rng.random_bool(0.75) {
                    EntryMode::Contactless
                } else if self.rng.random_bool(0.03) {
                    EntryMode::Magstripe
                } else {
                    EntryMode::Chip
                }
            }
        });
        let online = matches!(channel, Channel::Ecommerce);
        Payment {
            event_id,
            event_time: time,
            card_id: c.id.clone(),
            account_id: c.account.clone(),
            merchant_id: m.id.clone(),
            merchant_name: m.name.clone(),
            mcc: cat.mcc.to_string(),
            amount_minor,
            currency: COUNTRIES[m.country].currency.to_string(),
            merchant_country: COUNTRIES[m.country].code.to_string(),
            card_country: COUNTRIES[c.country].code.to_string(),
            channel,
            entry_mode,
            card_present,
            device_id: if online {
                Some(device.unwrap_or_else(|| c.device.clone()))
            } else {
                None
            },
            ip_address: if online {
                Some(ip.unwrap_or_else(|| c.ip.clone()))
            } else {
                None
            },
        }
    }

    fn legit(&mut self) -> (Payment, Label) {
        // Thinning gives the day/night curve: candidates arrive at the peak rate and are kept
        // with the hour's relative activity.
        loop {
            self.clock_ms += self.gap.sample(&mut self.rng);
            if !self.cfg.diurnal {
                break;
            }
            let hour = ((self.clock_ms as i64).rem_euclid(86_400_000) / 3_600_000) as usize;
            if self.rng.random_bool(DIURNAL[hour.min(23)]) {
                break;
            }
        }
        let time = self.clock_ms as i64;
        let card = self.card_picker.sample(&mut self.rng);
        let home = self.cards[card].country;
        let merchant = if self.rng.random_bool(0.7) {
            let f = &self.cards[card].favourites;
            f[self.rng.random_range(0..f.len())]
        } else {
            let cat = self.category_picker.sample(&mut self.rng);
            // Now and then the cardholder travels.
            let country = if self.rng.random_bool(0.03) {
                self.rng.random_range(0..9)
            } else {
                home
            };
            let pool = if self.rng.random_bool(0.25) {
                &self.online_by_category[cat]
            } else {
                &self.physical_by_country_category[country][cat]
            };
            pool[self.rng.random_range(0..pool.len())]
        };
        let m_cat = self.merchants[merchant].category;
        let m_country = self.merchants[merchant].country;
        let amount = if CATEGORIES[m_cat].mcc == "6011" {
            // Cash comes in twenties.
            let notes =
                self.rng.random_range(1..=10) as f64 * 20.0 * self.cards[card].spend.max(0.5);
            ((notes / 20.0).round().max(1.0) * 20.0 * COUNTRIES[m_country].per_eur).round() as i64
                * 100
        } else {
            let median = CATEGORIES[m_cat].median_eur * self.cards[card].spend;
            let eur = LogNormal::new(median.ln(), 0.6).map_or(median, |d| d.sample(&mut self.rng));
            self.amount_minor(eur, m_country)
        };
        let p = self.payment(time, card, merchant, amount, None, None, None);
        let label = Label {
            event_id: p.event_id,
            card_id: p.card_id.clone(),
            event_time: time,
            pattern: None,
            incident: None,
        };
        if self
            .rng
            .random_bool((self.cfg.incidents_per_10k / 10_000.0).min(1.0))
        {
            self.start_incident(time);
        }
        (p, label)
    }

    fn schedule(&mut self, payment: Payment, pattern: Pattern, incident: u64) {
        self.seq += 1;
        let label = Label {
            event_id: payment.event_id,
            card_id: payment.card_id.clone(),
            event_time: payment.event_time,
            pattern: Some(pattern),
            incident: Some(incident),
        };
        self.schedule.push(Reverse(Scheduled {
            time: payment.event_time,
            seq: self.seq,
            payment,
            label,
        }));
    }

    fn pick(&mut self, pool_of: impl Fn(&Self) -> Vec<usize>) -> usize {
        let pool = pool_of(self);
        pool[self.rng.random_range(0..pool.len())]
    }

    fn start_incident(&mut self, now: i64) {
        self.incidents += 1;
        let incident = self.incidents;
        let card = self.rng.random_range(0..self.cards.len());
        let home = self.cards[card].country;
        let roll: f64 = self.rng.random();
        let pattern = if roll < 0.4 {
            Pattern::CardTesting
        } else if roll < 0.75 {
            Pattern::AccountTakeover
        } else {
            Pattern::Velocity
        };
        let mut t = now as f64 + self.rng.random_range(5_000.0..120_000.0);
        let fraud_country = FRAUD_COUNTRIES[self.rng.random_range(0..FRAUD_COUNTRIES.len())];
        let fraud_device = hex_id(&mut self.rng, "dev_", 12);
        let fraud_ip = ip(&mut self.rng, COUNTRIES[fraud_country].ip_octet);
        match pattern {
            Pattern::CardTesting => {
                let n = self.rng.random_range(5..=25);
                let mut shops = Vec::new();
                for _ in 0..self.rng.random_range(1..=3) {
                    let cat = [11usize, 12, 5][self.rng.random_range(0..3)];
                    shops.push(self.pick(|s| s.online_by_category[cat].clone()));
                }
                let gap = Exp::new(1.0 / 20_000.0).ok();
                for _ in 0..n {
                    let m = shops[self.rng.random_range(0..shops.len())];
                    let amount = if self.rng.random_bool(0.2) {
                        100
                    } else {
                        self.rng.random_range(50..=300)
                    };
                    let p = self.payment(
                        t as i64,
                        card,
                        m,
                        amount,
                        Some(EntryMode::Manual),
                        Some(fraud_device.clone()),
                        Some(fraud_ip.clone()),
                    );
                    self.schedule(p, pattern, incident);
                    t += 2_000.0 + gap.map_or(20_000.0, |g| g.sample(&mut self.rng));
                }
                if self.rng.random_bool(0.5) {
                    let m = self.pick(|s| s.online_by_category[7].clone());
                    let eur = self.rng.random_range(150.0..600.0);
                    let country = self.merchants[m].country;
                    let amount = self.amount_minor(eur, country);
                    let p = self.payment(
                        t as i64,
                        card,
                        m,
                        amount,
                        Some(EntryMode::Manual),
                        Some(fraud_device),
                        Some(fraud_ip),
                    );
                    self.schedule(p, pattern, incident);
                }
            }
            Pattern::AccountTakeover => {
                let n = self.rng.random_range(2..=6);
                let gap = Exp::new(1.0 / 480_000.0).ok();
                for _ in 0..n {
                    let cat = [7usize, 14, 13][self.rng.random_range(0..3)];
                    let m = self.pick(|s| s.online_by_category[cat].clone());
                    let median = CATEGORIES[0].median_eur * self.cards[card].spend;
                    let eur = median * self.rng.random_range(5.0..25.0);
                    let amount = self.amount_minor(eur, fraud_country);
                    let mut p = self.payment(
                        t as i64,
                        card,
                        m,
                        amount,
                        None,
                        Some(fraud_device.clone()),
                        Some(fraud_ip.clone()),
                    );
                    // The merchant is abroad from the cardholder's point of view.
                    p.merchant_country = COUNTRIES[fraud_country].code.to_string();
                    p.currency = COUNTRIES[fraud_country].currency.to_string();
                    if p.merchant_country == p.card_country {
                        p.merchant_country = "BR".into();
                        p.currency = "BRL".into();
                    }
                    self.schedule(p, pattern, incident);
                    t += 30_000.0 + gap.map_or(480_000.0, |g| g.sample(&mut self.rng));
                }
            }
            Pattern::Velocity => {
                let n = self.rng.random_range(8..=30);
                let gap = Exp::new(1.0 / 45_000.0).ok();
                for _ in 0..n {
                    let atm = self.rng.random_bool(0.3);
                    let cat = if atm {
                        15
                    } else {
                        [0usize, 5, 6, 7, 3][self.rng.random_range(0..5)]
                    };
                    let m = self.pick(|s| s.physical_by_country_category[home][cat].clone());
                    let country = self.merchants[m].country;
                    let amount = if atm {
                        (self.rng.random_range(5..=20) as f64 * 20.0 * COUNTRIES[country].per_eur)
                            .round() as i64
                            * 100
                    } else {
                        let eur = CATEGORIES[cat].median_eur
                            * self.cards[card].spend
                            * self.rng.random_range(1.0..3.0);
                        self.amount_minor(eur, country)
                    };
                    // Skimmed cards are cloned onto magnetic stripes.
                    let mode = if atm || self.rng.random_bool(0.6) {
                        EntryMode::Magstripe
                    } else {
                        EntryMode::Chip
                    };
                    let p = self.payment(t as i64, card, m, amount, Some(mode), None, None);
                    self.schedule(p, pattern, incident);
                    t += 5_000.0 + gap.map_or(45_000.0, |g| g.sample(&mut self.rng));
                }
            }
        }
    }
}

impl Card {
    fn account_of(card: &Card) -> String {
        card.account.clone()
    }
}

impl Iterator for Simulator {
    type Item = (Payment, Label);

    fn next(&mut self) -> Option<Self::Item> {
        // The next legitimate event is at or after the clock; anything scheduled before the
        // clock's next tick goes first, so the stream is in event-time order.
        let due = self
            .schedule
            .peek()
            .is_some_and(|Reverse(s)| (s.time as f64) <= self.clock_ms);
        if due {
            return self.schedule.pop().map(|Reverse(s)| (s.payment, s.label));
        }
        let (p, l) = self.legit();
        // Fraud events scheduled before this legitimate one must come out first: hold it back.
        if self
            .schedule
            .peek()
            .is_some_and(|Reverse(s)| s.time < p.event_time)
        {
            self.seq += 1;
            let time = p.event_time;
            self.schedule.push(Reverse(Scheduled {
                time,
                seq: self.seq,
                payment: p,
                label: l,
            }));
            return self.schedule.pop().map(|Reverse(s)| (s.payment, s.label));
        }
        Some((p, l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(cfg: SimConfig, n: usize) -> Vec<(Payment, Label)> {
        Simulator::new(cfg).expect("valid config").take(n).collect()
    }

    #[test]
    fn same_seed_same_stream_other_seed_other_stream() {
        let a = take(SimConfig::default(), 2_000);
        let b = take(SimConfig::default(), 2_000);
        assert_eq!(a, b);
        let c = take(
            SimConfig {
                seed: 7,
                ..SimConfig::default()
            },
            2_000,
        );
        assert_ne!(a, c);
    }

    #[test]
    fn stream_is_in_event_time_order_with_unique_ids() {
        let events = take(SimConfig::default(), 50_000);
        assert!(
            events
                .windows(2)
                .all(|w| w[0].0.event_time <= w[1].0.event_time)
        );
        let ids: std::collections::HashSet<_> = events.iter().map(|(p, _)| p.event_id).collect();
        assert_eq!(ids.len(), events.len());
        assert!(
            events
                .iter()
                .all(|(p, l)| p.event_id == l.event_id && p.card_id == l.card_id)
        );
    }

    #[test]
    fn fraud_is_injected_in_every_pattern_at_about_the_configured_rate() {
        // A slow event rate so incidents (up to an hour long) end well inside the sample.
        let cfg = SimConfig {
            incidents_per_10k: 20.0,
            events_per_sec: 10.0,
            ..SimConfig::default()
        };
        let events = take(cfg, 100_000);
        let fraud: Vec<_> = events.iter().filter(|(_, l)| l.pattern.is_some()).collect();
        let share = fraud.len() as f64 / events.len() as f64;
        // ~20 incidents per 10k legit events × ~11 events per incident ≈ 2%.
        assert!((0.015..0.04).contains(&share), "fraud share {share}");
        for pattern in [
            Pattern::CardTesting,
            Pattern::AccountTakeover,
            Pattern::Velocity,
        ] {
            assert!(
                fraud.iter().any(|(_, l)| l.pattern == Some(pattern)),
                "{pattern:?} missing"
            );
        }
        // Card testing is tiny amounts; account takeover happens abroad from a new device.
        for (p, l) in &fraud {
            match l.pattern {
                Some(Pattern::CardTesting) if p.mcc != "5732" => {
                    assert!(p.amount_minor <= 300, "{p:?}")
                }
                Some(Pattern::AccountTakeover) => {
                    assert_ne!(p.merchant_country, p.card_country);
                    assert_eq!(p.channel, Channel::Ecommerce);
                }
                _ => {}
            }
        }
    }

    #[test]
    fn amounts_look_like_card_payments() {
        let events = take(SimConfig::default(), 20_000);
        let mut eur: Vec<i64> = events
            .iter()
            .filter(|(p, _)| p.currency == "EUR")
            .map(|(p, _)| p.amount_minor)
            .collect();
        eur.sort_unstable();
        let median = eur[eur.len() / 2];
        // Median ticket between 10 and 80 euros; a long tail above 500.
        assert!((1_000..8_000).contains(&median), "median {median}");
        assert!(eur.iter().any(|&a| a > 50_000));
        assert!(events.iter().all(|(p, _)| p.amount_minor > 0));
        // Cards are reused: far fewer distinct cards than events.
        let cards: std::collections::HashSet<_> = events.iter().map(|(p, _)| &p.card_id).collect();
        assert!(cards.len() < events.len() / 2);
    }
}
