CREATE INDEX gadgets_widget_idx ON gadgets (widget_id);
