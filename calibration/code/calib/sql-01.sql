-- Schema and reporting queries for a small warehouse inventory.
-- Written for SQLite 3.25+ (uses window functions).

PRAGMA foreign_keys = ON;

CREATE TABLE IF NOT EXISTS supplier (
    supplier_id   INTEGER PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    country       TEXT NOT NULL DEFAULT 'CN'
);

CREATE TABLE IF NOT EXISTS product (
    product_id    INTEGER PRIMARY KEY,
    sku           TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL,
    supplier_id   INTEGER REFERENCES supplier(supplier_id),
    unit_cost     NUMERIC NOT NULL CHECK (unit_cost >= 0),
    reorder_point INTEGER NOT NULL DEFAULT 10
);

-- Every change in stock is a row; current stock is the sum of deltas.
CREATE TABLE IF NOT EXISTS stock_movement (
    movement_id   INTEGER PRIMARY KEY,
    product_id    INTEGER NOT NULL REFERENCES product(product_id),
    delta         INTEGER NOT NULL CHECK (delta <> 0),
    reason        TEXT NOT NULL CHECK (reason IN ('receive', 'sale', 'adjust', 'return')),
    moved_at      TEXT NOT NULL DEFAULT (datetime('now'))
);

CREATE INDEX IF NOT EXISTS idx_movement_product
    ON stock_movement (product_id, moved_at);

CREATE VIEW IF NOT EXISTS current_stock AS
SELECT p.product_id,
       p.sku,
       p.name,
       COALESCE(SUM(m.delta), 0)               AS on_hand,
       p.reorder_point,
       COALESCE(SUM(m.delta), 0) * p.unit_cost AS stock_value
FROM product p
LEFT JOIN stock_movement m ON m.product_id = p.product_id
GROUP BY p.product_id;

-- Sample data
INSERT INTO supplier (name, country) VALUES
    ('Eastern Fasteners', 'CN'),
    ('Nordic Tools', 'SE');

INSERT INTO product (sku, name, supplier_id, unit_cost, reorder_point) VALUES
    ('BOLT-M6', 'M6 hex bolt', 1, 0.12, 200),
    ('NUT-M6',  'M6 nut',      1, 0.05, 200),
    ('SAW-300', 'Hand saw',    2, 14.50, 5);

INSERT INTO stock_movement (product_id, delta, reason) VALUES
    (1, 500, 'receive'), (1, -320, 'sale'),
    (2, 150, 'receive'), (3, 12, 'receive'), (3, -9, 'sale');

-- Products that need reordering
SELECT sku, name, on_hand, reorder_point
FROM current_stock
WHERE on_hand <= reorder_point
ORDER BY on_hand * 1.0 / reorder_point;

-- Stock value per supplier, with each supplier's share of the total
SELECT s.name,
       ROUND(SUM(c.stock_value), 2) AS value,
       ROUND(100.0 * SUM(c.stock_value) / SUM(SUM(c.stock_value)) OVER (), 1) AS pct
FROM current_stock c
JOIN product  p ON p.product_id = c.product_id
JOIN supplier s ON s.supplier_id = p.supplier_id
GROUP BY s.supplier_id
ORDER BY value DESC;

-- Running balance for one product
SELECT moved_at, reason, delta,
       SUM(delta) OVER (ORDER BY movement_id) AS balance
FROM stock_movement
WHERE product_id = 1;
