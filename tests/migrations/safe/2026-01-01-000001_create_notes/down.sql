DROP TABLE other; DROP TABLE notes;
