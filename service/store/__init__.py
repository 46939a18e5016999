"""Keep what must outlive a request in the database: feedback and the cards it refers to."""
