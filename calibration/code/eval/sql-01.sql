-- Library loans: schema plus a few reporting queries (PostgreSQL).

CREATE TABLE member (
    member_id   SERIAL PRIMARY KEY,
    full_name   TEXT NOT NULL,
    joined_on   DATE NOT NULL DEFAULT CURRENT_DATE
);

CREATE TABLE book (
    book_id     SERIAL PRIMARY KEY,
    isbn        CHAR(13) UNIQUE,
    title       TEXT NOT NULL,
    author      TEXT NOT NULL,
    copies      SMALLINT NOT NULL DEFAULT 1 CHECK (copies > 0)
);

CREATE TABLE loan (
    loan_id     SERIAL PRIMARY KEY,
    book_id     INT NOT NULL REFERENCES book,
    member_id   INT NOT NULL REFERENCES member,
    loaned_on   DATE NOT NULL DEFAULT CURRENT_DATE,
    due_on      DATE NOT NULL DEFAULT CURRENT_DATE + 21,
    returned_on DATE,
    CHECK (returned_on IS NULL OR returned_on >= loaned_on)
);

-- Open loans are looked up constantly; a partial index keeps it small.
CREATE INDEX loan_open_idx ON loan (book_id) WHERE returned_on IS NULL;

-- Copies currently available for each book.
SELECT b.title,
       b.copies - COUNT(l.loan_id) AS available
FROM book b
LEFT JOIN loan l ON l.book_id = b.book_id AND l.returned_on IS NULL
GROUP BY b.book_id
ORDER BY available, b.title;

-- Overdue loans with days late and a fine of 0.20 per day, capped at 10.
SELECT m.full_name,
       b.title,
       CURRENT_DATE - l.due_on                          AS days_late,
       LEAST(10.00, 0.20 * (CURRENT_DATE - l.due_on))   AS fine
FROM loan l
JOIN member m USING (member_id)
JOIN book   b USING (book_id)
WHERE l.returned_on IS NULL
  AND l.due_on < CURRENT_DATE
ORDER BY days_late DESC;

-- Top three most borrowed authors in the last year.
SELECT author, COUNT(*) AS loans
FROM loan
JOIN book USING (book_id)
WHERE loaned_on >= CURRENT_DATE - INTERVAL '1 year'
GROUP BY author
ORDER BY loans DESC
LIMIT 3;
