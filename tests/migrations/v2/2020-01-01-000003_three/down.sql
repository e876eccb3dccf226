DROP INDEX gadgets_widget_idx;
