"""A synthetic user-activity generator: the embedded default data set.

Produces `UserTimelines` in the same format as the MovieLens readers, with
structure that a sequence model can learn and popularity cannot:

- items have 1-2 genres, a release year, a heavy-tailed popularity and a readable
  title built from genre-specific words (so an LLM can learn genre from titles);
- each user has a taste over genres (Dirichlet) that drifts linearly from a start
  taste to an end taste over the user's timeline;
- each next item is drawn without replacement from
  `softmax(popularity_exponent * log_popularity + taste_strength * log affinity)`,
  and with probability `follow_prob` from the `num_related` items related to the
  previous one (same primary genre), a short-range sequential signal; with
  `communities` = C > 0, user i belongs to community i mod C and each
  community has its own map of related items (communities that consume the
  same catalogue in different orders: what a client of one community
  teaches a model, another's does not);
- ratings rise with the item's affinity to the user's current taste.

Users advance one event per step together (vectorised over users), up to
`USERS_PER_CHUNK` users at a time, so memory stays bounded at any population
and time is linear in events: about 3 s per 10^5 events at 1,000 items on
one CPU core (100,000 users, 6.0 million events: 182 s, benchmarks/results/
population.md). Deterministic in `seed`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data import timelines as tl
from infra.errors import ConfigError

GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical",
          "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
_NOUNS = {
    "Action": "Strike Fury Mission Bullet Showdown Vengeance Impact Pursuit Blast Raid Siege Rampage",
    "Adventure": "Quest Expedition Treasure Voyage Island Journey Frontier Compass Horizon Map Summit Jungle",
    "Animation": "Toys Critters Bunny Dragonfly Puppet Cartoon Robots Paperboat Fox Balloon Snowmen Kitten",
    "Children's": "Playground Treehouse Puppy Birthday Lunchbox Schoolbus Kite Teddy Sandcastle Crayon Lullaby Pony",
    "Comedy": "Wedding Roommates Vacation Blunder Party In-Laws Neighbors Mixup Prank Roadtrip Bachelor Office",
    "Crime": "Heist Syndicate Alibi Racket Informant Getaway Precinct Mobster Con Ransom Witness Underworld",
    "Documentary": "Chronicles Report Archive Portrait Record Inquiry Testimony Footage Fieldnotes Census Survey Atlas",
    "Drama": "Letters Promise Silence Inheritance Homecoming Confession Season Farewell Garden Reunion Tides Harvest",
    "Fantasy": "Wizard Kingdom Sorcerer Unicorn Enchantment Prophecy Amulet Dragon Realm Spellbook Elves Crown",
    "Film-Noir": "Shadow Dame Detective Rain Doublecross Nightclub Fog Smoke Alley Blackmail Trenchcoat Neon",
    "Horror": "Haunting Curse Crypt Nightmare Possession Asylum Ghoul Ritual Cellar Scream Hollow Skull",
    "Musical": "Melody Chorus Ballroom Serenade Overture Encore Rhythm Tapshoes Duet Jukebox Cabaret Harmony",
    "Mystery": "Riddle Clue Cipher Puzzle Manor Disappearance Enigma Key Labyrinth Whisper Lockbox Footprints",
    "Romance": "Kiss Heart Valentine Sweetheart Loveletter Rose Honeymoon Embrace Moonlight Waltz Darling Bouquet",
    "Sci-Fi": "Galaxy Android Starship Cyborg Nebula Quantum Orbit Clone Planet Wormhole Laser Colony",
    "Thriller": "Conspiracy Hostage Countdown Stranger Trap Pursuer Target Coverup Deadline Fugitive Paranoia Switch",
    "War": "Battalion Trenches Armistice Bunker Platoon Beachhead Regiment Fortress Convoy Sniper Brigade Frontline",
    "Western": "Canyon Outlaw Saloon Ranch Sheriff Stagecoach Gunslinger Mesa Rustler Prairie Posse Badlands",
}
_ADJECTIVES = ("Midnight Silent Golden Last Broken Crimson Hidden Wild Lonely Eternal "
               "Secret Burning Frozen Distant Savage Gentle Electric Forgotten Final "
               "Endless Scarlet Hollow Brave Restless").split()
_OCCUPATIONS = ("student", "engineer", "artist", "educator", "healthcare",
                "executive", "programmer", "retired", "writer", "other")
_START_TIME = 946684800  # 2000-01-01, unix seconds.


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """Size and structure of a synthetic data set (mirrors config.data.synthetic)."""
  num_users: int = 2000
  num_items: int = 1000
  num_genres: int = 18
  min_events: int = 20
  mean_extra_events: float = 40.0
  max_events: int = 300
  taste_concentration: float = 0.3
  taste_strength: float = 3.0
  popularity_exponent: float = 0.5
  follow_prob: float = 0.35
  num_related: int = 5
  communities: int = 0  # > 0: a related-items map per community (i mod C)
  seed: int = 0

  def validate(self) -> "SyntheticSpec":
    checks = {
        "num_users": self.num_users >= 1,
        "num_items": self.num_items >= self.max_events + self.num_related,
        "num_genres": 1 <= self.num_genres <= len(GENRES),
        "min_events": 1 <= self.min_events <= self.max_events,
        "mean_extra_events": self.mean_extra_events >= 0,
        "follow_prob": 0 <= self.follow_prob <= 1,
        "num_related": self.num_related >= 1,
        "taste_concentration": self.taste_concentration > 0,
        "communities": 0 <= self.communities <= self.num_users,
    }
    for field, ok in checks.items():
      if not ok:
        raise ConfigError(f"config.data.synthetic.{field}={getattr(self, field)!r}"
                         " is out of range (num_items must exceed max_events + "
                         f"num_related; num_genres at most {len(GENRES)})")
    return self


def generate(spec: SyntheticSpec) -> tl.UserTimelines:
  """Generates a synthetic data set; the same spec gives the same arrays."""
  spec.validate()
  rng = np.random.default_rng(spec.seed)
  items, log_popularity, primary = _make_items(spec, rng)
  related = community_maps(spec, primary, _related_items(primary, spec.num_related,
                                                         rng))
  users = _make_users(spec, rng)
  item_ids, ratings, timestamps, lengths = _simulate(
      spec, rng, items.genres[1:], log_popularity, related)
  return tl.UserTimelines(
      name="synthetic",
      user_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
      item_ids=item_ids, ratings=ratings, timestamps=timestamps,
      items=items, users=users, source="config.data.synthetic").validate()


def _make_items(spec: SyntheticSpec, rng: np.random.Generator):
  """Item table, [num_items] log popularity and [num_items] primary genre."""
  n, g = spec.num_items, spec.num_genres
  primary = rng.integers(0, g, n)
  genres = np.zeros((n, g), bool)
  genres[np.arange(n), primary] = True
  has_second = rng.random(n) < 0.4
  second = (primary + rng.integers(1, max(g, 2), n)) % g
  genres[np.nonzero(has_second)[0], second[has_second]] = True
  log_popularity = rng.normal(0.0, 1.2, n)
  years = (2000 - np.minimum(rng.exponential(12.0, n), 70)).astype(np.int32)
  titles = _titles(primary, rng)
  return tl.ItemTable(
      raw_ids=np.arange(n + 1, dtype=np.int64),
      titles=np.array([""] + titles, object),
      years=np.concatenate([[0], years]).astype(np.int32),
      genres=np.concatenate([np.zeros((1, g), bool), genres]),
      genre_names=GENRES[:g]), log_popularity, primary


def _titles(primary: np.ndarray, rng: np.random.Generator) -> list[str]:
  """Readable, unique titles whose nouns come from the item's primary genre."""
  taken: dict[str, int] = {}
  titles = []
  for genre in primary:
    nouns = _NOUNS[GENRES[genre]].split()
    adjective = _ADJECTIVES[rng.integers(len(_ADJECTIVES))]
    noun = nouns[rng.integers(len(nouns))]
    base = f"The {adjective} {noun}" if rng.random() < 0.5 else f"{adjective} {noun}"
    taken[base] = taken.get(base, 0) + 1
    titles.append(base if taken[base] == 1 else f"{base} {taken[base]}")
  return titles


def _related_items(primary: np.ndarray, k: int, rng: np.random.Generator
                   ) -> np.ndarray:
  """[num_items, k] item indices (0-based) sharing each item's primary genre."""
  related = np.empty((len(primary), k), np.int64)
  for genre in np.unique(primary):
    members = np.nonzero(primary == genre)[0]
    for item in members:
      pool = members[members != item]
      if len(pool) < k:  # tiny genres borrow from everywhere
        pool = np.setdiff1d(np.arange(len(primary)), [item])
      related[item] = rng.choice(pool, k, replace=False)
  return related


def community_maps(spec: SyntheticSpec, primary: np.ndarray,
                   shared: np.ndarray) -> np.ndarray:
  """[max(C, 1), num_items, k] the related items of each community: the
  shared map alone without communities, else one map per community drawn
  from a generator of its own (so the data without communities is unchanged)."""
  if not spec.communities:
    return shared[None]
  rng = np.random.default_rng([spec.seed, 7])
  return np.stack([_related_items(primary, spec.num_related, rng)
                   for _ in range(spec.communities)])


def community_of_users(spec: SyntheticSpec) -> np.ndarray:
  """[num_users] each user's community: i mod C (all 0 without communities)."""
  return np.arange(spec.num_users) % max(spec.communities, 1)


def _make_users(spec: SyntheticSpec, rng: np.random.Generator) -> tl.UserTable:
  n = spec.num_users
  return tl.UserTable(
      raw_ids=np.arange(1, n + 1, dtype=np.int64),
      ages=rng.integers(18, 70, n).astype(np.int32),
      genders=np.array(rng.choice(["F", "M"], n), object),
      occupations=np.array(rng.choice(_OCCUPATIONS, n), object),
      zip_codes=np.char.zfill(rng.integers(0, 100000, n).astype(str), 5).astype(object))


# Users stepped together at a time: the step's [chunk, num_items] arrays bound
# memory whatever the population (measured: 990 MiB peak for 100,000 users at
# 1,000 items, benchmarks/results/population.md); time is linear in events.
# Populations up to this size come out exactly as they did before populations
# were chunked (one chunk draws the same random numbers).
USERS_PER_CHUNK = 16384


def _simulate(spec, rng, genres, log_popularity, related):
  """Every user's events, `USERS_PER_CHUNK` users at a time; returns flat event
  arrays (user-major) and per-user lengths."""
  u = spec.num_users
  lengths = np.minimum(
      spec.min_events + rng.geometric(1.0 / (1.0 + spec.mean_extra_events), u) - 1,
      spec.max_events)
  alpha = np.full(spec.num_genres, spec.taste_concentration)
  taste_start, taste_end = rng.dirichlet(alpha, u), rng.dirichlet(alpha, u)
  community = community_of_users(spec)
  chunks = [_simulate_chunk(spec, rng, genres, log_popularity, related,
                            community[s:s + USERS_PER_CHUNK],
                            lengths[s:s + USERS_PER_CHUNK],
                            taste_start[s:s + USERS_PER_CHUNK],
                            taste_end[s:s + USERS_PER_CHUNK])
            for s in range(0, u, USERS_PER_CHUNK)]
  chosen, affinity, noise, timestamps = (np.concatenate(parts) for parts in zip(*chunks))
  # Ratings rise with the chosen item's affinity, centred over all events.
  centred = (affinity - affinity.mean()) / (affinity.std() + 1e-9)
  ratings = np.clip(np.round(3.4 + 0.9 * centred + noise), 1, 5)
  return (chosen.astype(np.int32) + 1, ratings.astype(np.float32), timestamps,
          lengths.astype(np.int64))


def _simulate_chunk(spec, rng, genres, log_popularity, related, community,
                    lengths, taste_start, taste_end):
  """Steps a chunk of users together (related: [communities, items, k];
  community: [chunk] each user's). Returns flat [events of the chunk]
  arrays: chosen item (0-based), its affinity, rating noise, timestamp."""
  u, n = len(lengths), spec.num_items
  genre_share = genres / genres.sum(1, keepdims=True)  # [items, genres]
  base_logits = (spec.popularity_exponent * log_popularity).astype(np.float32)

  seen = np.zeros((u, n), bool)
  last = np.zeros(u, np.int64)
  steps = int(lengths.max())
  chosen = np.zeros((u, steps), np.int64)
  affinity_of_choice = np.zeros((u, steps), np.float32)
  for t in range(steps):
    active = np.nonzero(lengths > t)[0]  # only users whose timeline goes on
    progress = np.minimum(t / np.maximum(lengths[active] - 1, 1), 1.0)[:, None]
    taste = (1 - progress) * taste_start[active] + progress * taste_end[active]
    affinity = (taste @ genre_share.T).astype(np.float32)  # [active, items]
    logits = base_logits + spec.taste_strength * np.log(affinity + 1e-3)
    if t > 0:
      follow = rng.random(len(active)) < spec.follow_prob
      bonus = np.zeros_like(logits)
      np.put_along_axis(bonus, related[community[active], last[active]], 1e3,
                        axis=1)
      logits += follow[:, None] * bonus
    logits[seen[active]] = -np.inf
    logits += rng.gumbel(size=logits.shape).astype(np.float32)
    pick = np.argmax(logits, axis=1)
    seen[active, pick] = True
    chosen[active, t], last[active] = pick, pick
    affinity_of_choice[active, t] = affinity[np.arange(len(active)), pick]

  valid = np.arange(steps)[None, :] < lengths[:, None]
  noise = rng.normal(0.0, 0.6, (u, steps))
  gaps = rng.exponential(86400.0, (u, steps)).astype(np.int64) + 1
  starts = _START_TIME + rng.integers(0, 365 * 86400, u)
  timestamps = starts[:, None] + np.cumsum(gaps, axis=1)
  return (chosen[valid], affinity_of_choice[valid], noise[valid],
          timestamps[valid])
