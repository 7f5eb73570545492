-- pgshift demo: a small car marketplace (50 cities, 20 categories, 500 users,
-- 1000 vehicles, 2000 listings). Deterministic: every value derives from
-- generate_series, except uuid keys and timestamps. Needs PostgreSQL 13+
-- (gen_random_uuid() is core since 13). Load into a fresh database.

BEGIN;

CREATE TABLE cities (
    id      integer PRIMARY KEY,
    name    text    NOT NULL,
    country text    NOT NULL
);

CREATE TABLE categories (
    id        integer PRIMARY KEY,
    name      text    NOT NULL UNIQUE,
    parent_id integer REFERENCES categories (id)
);

CREATE TABLE users (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email      text        NOT NULL UNIQUE,
    name       text        NOT NULL,
    city_id    integer     REFERENCES cities (id),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE vehicles (
    id          uuid    PRIMARY KEY DEFAULT gen_random_uuid(),
    make        text    NOT NULL,
    model       text    NOT NULL,
    year        integer NOT NULL CHECK (year BETWEEN 1950 AND 2100),
    category_id integer NOT NULL REFERENCES categories (id),
    mileage_km  integer NOT NULL CHECK (mileage_km >= 0)
);

CREATE TABLE listings (
    id         bigserial     PRIMARY KEY,
    vehicle_id uuid          NOT NULL REFERENCES vehicles (id),
    seller_id  bigint        NOT NULL REFERENCES users (id),
    price      numeric(12,2) NOT NULL CHECK (price > 0),
    status     text          NOT NULL DEFAULT 'active'
                             CHECK (status IN ('active', 'sold', 'withdrawn')),
    created_at timestamptz   NOT NULL DEFAULT now(),
    -- clock_timestamp(), not now(): rows written later in one transaction get later values,
    -- which makes this column useful for watching writes flow through the proxy.
    updated_at timestamptz   NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX listings_vehicle_id_idx ON listings (vehicle_id);
CREATE INDEX listings_seller_id_idx ON listings (seller_id);
CREATE INDEX listings_status_idx ON listings (status);
CREATE INDEX users_city_id_idx ON users (city_id);
CREATE INDEX vehicles_category_id_idx ON vehicles (category_id);

-- 50 cities: 10 real names per country, 5 countries.
INSERT INTO cities (id, name, country)
SELECT g,
       (ARRAY['Berlin', 'Hamburg', 'Munich', 'Cologne', 'Frankfurt',
              'Stuttgart', 'Dusseldorf', 'Leipzig', 'Dortmund', 'Essen',
              'Paris', 'Marseille', 'Lyon', 'Toulouse', 'Nice',
              'Nantes', 'Strasbourg', 'Montpellier', 'Bordeaux', 'Lille',
              'Madrid', 'Barcelona', 'Valencia', 'Seville', 'Zaragoza',
              'Malaga', 'Murcia', 'Palma', 'Bilbao', 'Alicante',
              'Rome', 'Milan', 'Naples', 'Turin', 'Palermo',
              'Genoa', 'Bologna', 'Florence', 'Bari', 'Catania',
              'Warsaw', 'Krakow', 'Lodz', 'Wroclaw', 'Poznan',
              'Gdansk', 'Szczecin', 'Bydgoszcz', 'Lublin', 'Bialystok'])[g],
       (ARRAY['DE', 'FR', 'ES', 'IT', 'PL'])[(g - 1) / 10 + 1]
FROM generate_series(1, 50) AS g;

-- 20 categories: 5 top-level, 15 children (3 per parent).
INSERT INTO categories (id, name, parent_id)
SELECT g,
       (ARRAY['Cars', 'Motorcycles', 'Vans', 'Trucks', 'Campers',
              'Sedan', 'Hatchback', 'SUV',
              'Sport bike', 'Cruiser', 'Scooter',
              'Panel van', 'Minibus', 'Pickup',
              'Light truck', 'Tractor unit', 'Tipper',
              'Motorhome', 'Caravan', 'Camper van'])[g],
       CASE WHEN g <= 5 THEN NULL ELSE (g - 6) / 3 + 1 END
FROM generate_series(1, 20) AS g;

-- 500 users spread over the cities; ids come from the identity column (1..500 on a fresh db).
INSERT INTO users (email, name, city_id, created_at)
SELECT format('user%s@example.com', g),
       (ARRAY['Anna', 'Ben', 'Clara', 'David', 'Eva', 'Felix', 'Greta', 'Hugo', 'Ines', 'Jonas'])[g % 10 + 1]
           || ' ' ||
       (ARRAY['Schmidt', 'Martin', 'Garcia', 'Rossi', 'Nowak', 'Weber', 'Dubois', 'Lopez', 'Bianchi', 'Kowalski'])[(g / 10) % 10 + 1],
       (g - 1) % 50 + 1,
       timestamptz '2024-01-01 00:00:00+00' + g * interval '7 hours'
FROM generate_series(1, 500) AS g;

-- 1000 vehicles; categories only from the 15 leaf categories (6..20).
INSERT INTO vehicles (make, model, year, category_id, mileage_km)
SELECT (ARRAY['Volkswagen', 'BMW', 'Audi', 'Renault', 'Peugeot',
              'Fiat', 'Seat', 'Skoda', 'Toyota', 'Ford'])[g % 10 + 1],
       (ARRAY['Alpha', 'Bravo', 'City', 'Delta', 'Eco',
              'Family', 'Grand', 'Hybrid'])[(g / 10) % 8 + 1],
       2005 + g % 20,
       6 + g % 15,
       (g * 7919) % 250000
FROM generate_series(1, 1000) AS g;

-- 2000 listings: each vehicle is listed twice, sellers cycle through all users, and the
-- status mix is 70% active, 20% sold, 10% withdrawn (1400 / 400 / 200). ORDER BY keeps
-- the bigserial ids in generate_series order.
INSERT INTO listings (vehicle_id, seller_id, price, status, created_at)
SELECT v.id,
       (s.g - 1) % 500 + 1,
       (2000 + (s.g * 104729) % 58000) + 0.99,
       CASE WHEN s.g % 10 < 7 THEN 'active' WHEN s.g % 10 < 9 THEN 'sold' ELSE 'withdrawn' END,
       timestamptz '2025-01-01 00:00:00+00' + s.g * interval '1 hour'
FROM (SELECT id, row_number() OVER (ORDER BY make, model, year, mileage_km, id) AS n FROM vehicles) AS v
JOIN generate_series(1, 2000) AS s(g) ON v.n = (s.g - 1) % 1000 + 1
ORDER BY s.g;

COMMIT;

ANALYZE;
