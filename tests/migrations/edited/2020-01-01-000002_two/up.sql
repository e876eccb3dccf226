CREATE TABLE gadgets (id BIGSERIAL PRIMARY KEY, widget_id BIGINT REFERENCES widgets (id), colour TEXT);
